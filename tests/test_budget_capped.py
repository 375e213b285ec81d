"""A request without max_tokens whose budget has less left than its worst case, on a real
node with the openai SDK: served, capped at what is left (its upstream is told the cap, the
answer's `aihub-output-capped` header says it), refused only when not even the floor of
`LEAST_OUTPUT_TOKENS` fits; and never past the cap, concurrent requests included."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import openai
import pytest

from node.config import DATABASE_FILE
from node.gateway.pipeline import LEAST_OUTPUT_TOKENS
from node.storage import open_store
from tests.conftest import NodeDir, RunningNode, concurrent_client, run_node
from tests.mocks.openai_mock import OpenAIMock
from tests.mocks.server import serve_app
from tests.test_budgets import make_key, spend_of
from tests.test_federation import HI as FEDERATION_HI
from tests.test_federation import LLAMA, cli, invite, make_peer, model_owners, wait_for
from tests.test_federation import sdk as federation_sdk

HI = [{"role": "user", "content": "hi there"}]
CAP = 1000  # micro-units; each deployment below costs 1 per token, in and out


@pytest.fixture
def upstream() -> Iterator[tuple[str, OpenAIMock]]:
    mock = OpenAIMock(api_key="sk-mock")
    with serve_app(mock) as url:
        yield url, mock


@pytest.fixture
def configured(node_dir: NodeDir, upstream, monkeypatch) -> NodeDir:
    """The node's folder with two deployments of the mock (spend is read once it stopped:
    a running node writes charges in batches)."""
    url, _ = upstream
    monkeypatch.setenv("CAPPED_TEST_KEY", "sk-mock")
    node_dir.add_config(
        f"""
[[models]]
name = "gpt-mock"
provider = "openai"
model = "mock-large"
base_url = "{url}/v1"
api_key_env = "CAPPED_TEST_KEY"
price_in = 1_000_000
price_out = 1_000_000

[[models]]
name = "gpt-resp"
provider = "openai"
model = "mock-large"
base_url = "{url}/v1"
api_key_env = "CAPPED_TEST_KEY"
responses = true
price_in = 1_000_000
price_out = 1_000_000
"""
    )
    return node_dir


@pytest.fixture
def node(configured: NodeDir) -> Iterator[RunningNode]:
    with run_node(configured) as running:
        yield running


def sdk(node: RunningNode, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key=key, max_retries=0)


def last_body(mock: OpenAIMock) -> dict:
    return msgspec.json.decode(mock.script.received[-1].body)


def test_a_small_budget_without_max_tokens_is_served_capped_then_refused_when_spent(
    configured, upstream
):
    _, mock = upstream
    key, key_id = make_key(configured.path, name="small", budget_micros=CAP)
    with run_node(configured) as node:
        client = sdk(node, key)
        # The full worst case (4,096 output tokens, 1 micro-unit each) is four times the budget.
        raw = client.chat.completions.with_raw_response.create(model="gpt-mock", messages=HI)
        cap = int(raw.headers["aihub-output-capped"])
        assert LEAST_OUTPUT_TOKENS <= cap < CAP
        # The upstream was told: it writes no more than the reservation pays for.
        assert last_body(mock)["max_tokens"] == cap
        charged = int(raw.headers["aihub-cost-micros"])
        assert raw.parse().choices[0].message.content
        caps = [cap]
        with pytest.raises(openai.RateLimitError) as refused:
            for _ in range(200):
                raw = client.chat.completions.with_raw_response.create(
                    model="gpt-mock", messages=HI
                )
                caps.append(int(raw.headers["aihub-output-capped"]))
                assert last_body(mock)["max_tokens"] == caps[-1]
                charged += int(raw.headers["aihub-cost-micros"])
        # With max_tokens the request is not capped: it fits, or is refused as before.
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-mock", messages=HI, max_tokens=5
        )
        assert "aihub-output-capped" not in raw.headers
        assert last_body(mock)["max_tokens"] == 5
        charged += int(raw.headers["aihub-cost-micros"])
    # Served while the floor fitted, each capped lower as the budget went; then refused, in
    # money, naming the key and the floor.
    assert len(caps) > 10 and caps == sorted(caps, reverse=True)
    assert min(caps) >= LEAST_OUTPUT_TOKENS
    body = refused.value.body
    assert isinstance(body, dict) and body["code"] == "insufficient_quota"
    assert "key `small`" in body["message"]
    assert f"down to {LEAST_OUTPUT_TOKENS} output tokens" in body["message"]
    spent, reserved = spend_of(configured.path, f"key:{key_id}")
    assert spent == charged <= CAP and reserved == 0
    # What is left would not pay for the floor and a prompt: the budget was used up, not
    # refused while it had room.
    assert CAP - spent < LEAST_OUTPUT_TOKENS + 20


def test_a_budget_with_room_for_the_worst_case_is_not_capped(node, upstream):
    _, mock = upstream
    key, _ = make_key(node.dir.path, name="roomy", budget_micros=1_000_000)
    raw = sdk(node, key).chat.completions.with_raw_response.create(model="gpt-mock", messages=HI)
    assert "aihub-output-capped" not in raw.headers
    assert last_body(mock)["max_tokens"] == 4096  # the deployment's own cap, as always


def test_responses_without_max_output_tokens_are_capped_on_both_kinds_of_deployment(node, upstream):
    """Translated into a chat call (an OpenAI-compatible chat deployment) and passed on as
    written (a `responses` deployment): either way the upstream gets the cap."""
    _, mock = upstream
    key, _ = make_key(node.dir.path, name="responder", budget_micros=CAP)
    client = sdk(node, key)
    raw = client.responses.with_raw_response.create(model="gpt-mock", input="hi there")
    cap = int(raw.headers["aihub-output-capped"])
    assert LEAST_OUTPUT_TOKENS <= cap < CAP
    assert mock.script.received[-1].path.endswith("/chat/completions")
    assert last_body(mock)["max_tokens"] == cap
    assert raw.parse().output_text
    raw = client.responses.with_raw_response.create(model="gpt-resp", input="hi there")
    cap = int(raw.headers["aihub-output-capped"])
    assert LEAST_OUTPUT_TOKENS <= cap < CAP
    assert mock.script.received[-1].path.endswith("/responses")
    assert last_body(mock)["max_output_tokens"] == cap


def test_a_capped_stream_says_so_and_is_charged_within_the_budget(configured, upstream):
    _, mock = upstream
    key, key_id = make_key(configured.path, name="streamer", budget_micros=CAP)
    with (
        run_node(configured) as node,
        sdk(node, key).chat.completions.with_streaming_response.create(
            model="gpt-mock", messages=HI, stream=True, stream_options={"include_usage": True}
        ) as response,
    ):
        cap = int(response.headers["aihub-output-capped"])
        chunks = list(response.parse())
    assert last_body(mock)["max_tokens"] == cap
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens <= cap
    spent, reserved = spend_of(configured.path, f"key:{key_id}")
    assert 0 < spent <= CAP and reserved == 0


def priced_slow_echo(node_dir: NodeDir) -> None:
    # A slow echo at 5 micro-units a token: ~90 an answer, ~20,000 its full worst case.
    node_dir.set_config(
        'name = "echo"\nprovider = "echo"\nprice_in = 100_000\nprice_out = 200_000',
        'name = "echo"\nprovider = "echo"\nprice_in = 5_000_000\nprice_out = 5_000_000\n'
        "latency_ms = 30",
    )


async def fire_without_max_tokens(url: str, key: str, count: int) -> list[httpx.Response]:
    body = {"model": "echo", "messages": [{"role": "user", "content": "hello world"}]}
    async with concurrent_client(url, count) as client:
        headers = {"authorization": f"Bearer {key}"}
        return await asyncio.gather(
            *(client.post("/v1/chat/completions", json=body, headers=headers) for _ in range(count))
        )


def test_concurrent_requests_without_max_tokens_never_pass_the_cap(node_dir):
    priced_slow_echo(node_dir)
    key, key_id = make_key(node_dir.path, name="busy", budget_micros=CAP)
    charged = 0
    rounds: list[int] = []
    with run_node(node_dir) as node:
        # Waves of 100 concurrent requests until one wave gets nothing through.
        while not rounds or rounds[-1]:
            responses = asyncio.run(fire_without_max_tokens(node.url, key, 100))
            statuses = [r.status_code for r in responses]
            assert set(statuses) <= {200, 429}, statuses
            refused = [r for r in responses if r.status_code == 429]
            assert all(r.json()["error"]["code"] == "insufficient_quota" for r in refused)
            served = [r for r in responses if r.status_code == 200]
            assert all(int(r.headers["aihub-output-capped"]) >= 1 for r in served)
            charged += sum(int(r.headers["aihub-cost-micros"]) for r in served)
            rounds.append(len(served))
            assert len(rounds) < 40
    spent, reserved = spend_of(node_dir.path, f"key:{key_id}")
    assert spent == charged <= CAP and reserved == 0
    assert sum(rounds) >= 5  # the budget was used, several answers' worth


def test_a_peers_cap_with_less_left_than_the_worst_case_serves_its_requests_capped(tmp_path):
    """Bob's client sets no max_tokens; bob's node sends alice its own bound (4,096) marked
    as one she may lower: alice serves it capped at what her cap for bob has left, instead of
    refusing while the cap still has room, and refuses only once not even the floor fits."""
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    with alice.run(), bob.run() as b:
        # $0.001 at 1 micro-unit a token: a quarter of the 4,096-token worst case.
        cli("join", invite(alice, "--cap", "0.001"), "--data-dir", str(bob.path))
        assert wait_for(lambda: "llama3" in model_owners(b))
        client = federation_sdk(b)
        served = 0
        with pytest.raises(openai.RateLimitError) as refused:
            for _ in range(200):
                reply = client.chat.completions.create(model="llama3", messages=FEDERATION_HI)
                assert reply.choices[0].message.content
                served += 1
        assert served > 10  # refused only when the cap was used up, not at the first request
        body = refused.value.body
        assert isinstance(body, dict) and body["code"] == "peer_cap_exceeded"
        assert "alice" in body["message"]
        bob_key = next(k for k in keys_of(alice.path) if k.peer_id is not None)
    spent, reserved = spend_of(alice.path, f"key:{bob_key.id}")
    assert 0 < spent <= 1000 and reserved == 0
    assert 1000 - spent < LEAST_OUTPUT_TOKENS + 20  # the cap was used, not refused with room


def keys_of(path: Path) -> list:
    async def read() -> list:
        store = await open_store(path / DATABASE_FILE)
        try:
            return await store.keys.keys()
        finally:
            await store.close()

    return asyncio.run(read())
