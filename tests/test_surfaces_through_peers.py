"""Every surface through a peer, with the official SDKs: bob's clients use a model only alice
serves. Bob reaches alice through chat completions (peers speak that) and renders her answer
in his client's API; each call is charged where it ran, recorded on both sides, and carries
alice's signed receipt, which bob keeps (and alice keeps her copy of); the cap alice gave
bob runs out and holds on every surface. Endpoints not offered to peers refuse a peer's key.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anthropic
import httpx
import msgspec
import openai
import pytest

from node.config import DATABASE_FILE
from tests.test_federation import (
    LLAMA,
    _bobs_key_at_alice,
    _signed_by,
    cli,
    invite,
    make_peer,
    model_owners,
    usage_rows,
    wait_for,
)

HELLO = [{"role": "user", "content": "Hello, hub"}]
WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def receipts(path: Path) -> int:
    with sqlite3.connect(path / DATABASE_FILE) as db:
        return db.execute("SELECT count(*) FROM receipts").fetchone()[0]


def served_at(path: Path) -> int:
    return len([r for r in usage_rows(path) if r.status == 200])


def consumed_at(path: Path) -> int:
    return len([r for r in usage_rows(path) if r.deployment == "llama3@alice" and r.status == 200])


def test_the_anthropic_sdk_through_a_peer_with_tools_receipts_and_the_cap(tmp_path):
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    with alice.run(), bob.run() as b:
        token = invite(alice, "--models", "llama3", "--cap", "0.002")
        cli("join", token, "--data-dir", str(bob.path))
        assert wait_for(lambda: model_owners(b).get("llama3") == "alice")
        with anthropic.Anthropic(base_url=b.url, api_key=b.key, max_retries=0) as client:
            reply = client.messages.create(model="llama3", max_tokens=16, messages=HELLO)
            assert reply.content[0].text == "echo: Hello, hub" and reply.stop_reason == "end_turn"
            with client.messages.stream(model="llama3", max_tokens=16, messages=HELLO) as stream:
                assert "".join(stream.text_stream) == "echo: Hello, hub"
                assert stream.get_final_message().usage.output_tokens == 3
            question = {"role": "user", "content": "What does get_weather say for Paris?"}
            called = client.messages.create(
                model="llama3", max_tokens=32, tools=[WEATHER], messages=[question]
            )
            assert called.stop_reason == "tool_use"
            (use,) = [block for block in called.content if block.type == "tool_use"]
            assert use.name == "get_weather" and isinstance(use.input["city"], str)
            result = {"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}
            with client.messages.stream(
                model="llama3",
                max_tokens=16,
                tools=[WEATHER],
                messages=[
                    question,
                    {"role": "assistant", "content": called.content},
                    {"role": "user", "content": [result, {"type": "text", "text": "thanks"}]},
                ],
            ) as stream:
                answered = stream.get_final_message()
            assert answered.content[0].text == "echo: thanks"
            # Four calls: each served by alice, consumed by bob, with its receipt on both sides.
            assert wait_for(lambda: served_at(alice.path) == 4 and consumed_at(bob.path) == 4)
            assert wait_for(lambda: receipts(bob.path) == 4 and receipts(alice.path) == 4)
            # Long answers ($1 per 1M tokens each way) spend the $0.002 cap in a few calls.
            long = [{"role": "user", "content": " ".join(["word"] * 200)}]
            refused = None
            for _ in range(20):
                try:
                    client.messages.create(model="llama3", max_tokens=300, messages=long)
                except anthropic.RateLimitError as error:
                    refused = error
                    break
            assert refused is not None and refused.body["error"]["type"] == "rate_limit_error"
            with (
                pytest.raises(anthropic.RateLimitError),
                client.messages.stream(model="llama3", max_tokens=300, messages=long) as s,
            ):
                s.get_final_message()
    spent = [r.cost_micros for r in usage_rows(alice.path) if r.status == 200]
    assert 0 < sum(spent) <= 2000
    assert receipts(bob.path) == len(spent)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/images/generations"])
def test_a_peers_key_is_refused_where_peers_are_not_served(tmp_path, path):
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    with alice.run() as a, bob.run():
        cli("join", invite(alice), "--data-dir", str(bob.path))
        key = _bobs_key_at_alice(bob.path)
        body = msgspec.json.encode({"model": "llama3", "prompt": "hi"})
        signed = _signed_by(bob.path, a.url + path, body, key)
        bare = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        for headers in (signed, bare):
            response = httpx.post(a.url + path, content=body, headers=headers, timeout=30)
            assert response.status_code == 403, response.text
            error = response.json()["error"]
            assert error["code"] == "not_offered_to_peers"
            assert error["message"] == "This endpoint is not offered to peers"
        with (
            openai.OpenAI(base_url=a.url + "/v1", api_key=key, max_retries=0) as client,
            pytest.raises(openai.PermissionDeniedError),
        ):
            client.completions.create(model="llama3", prompt="hi")
    assert [r for r in usage_rows(alice.path) if r.status == 200] == []
