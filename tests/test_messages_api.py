"""The official `anthropic` SDK, unchanged, against a real node's Messages API.

One node serves the echo model, an OpenAI-compatible mock (`gpt-mock`) and an Anthropic mock
(`claude`): the Messages surface is served by every adapter, through the same pipeline (and so
the same keys, budgets and usage records) as chat completions.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from node.provision import create_node
from tests.conftest import NodeDir, RunningNode, run_node
from tests.mocks.anthropic_mock import AnthropicMock
from tests.mocks.openai_mock import OpenAIMock
from tests.mocks.server import serve_app
from tests.test_federation import LLAMA, cli, invite, make_peer, model_owners, usage_rows, wait_for

ANTHROPIC_KEY = "sk-ant-mock"
WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
HELLO = [{"role": "user", "content": "Hello, hub"}]


class Served:
    def __init__(self, node: RunningNode, openai_mock: OpenAIMock, claude: AnthropicMock) -> None:
        self.node = node
        self.url = node.url
        self.key = node.key
        self.openai_mock = openai_mock
        self.claude = claude


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder: Path = tmp_path_factory.mktemp("messages") / "node"
    _, key = create_node(folder, "messages-node")
    openai_mock = OpenAIMock(api_key="sk-upstream")
    claude = AnthropicMock(models=("claude-mock",), api_key=ANTHROPIC_KEY)
    os.environ["MESSAGES_TEST_OPENAI_KEY"] = "sk-upstream"
    os.environ["MESSAGES_TEST_ANTHROPIC_KEY"] = ANTHROPIC_KEY
    with serve_app(openai_mock) as openai_url, serve_app(claude) as claude_url:
        directory = NodeDir(folder, key)
        directory.add_config(
            f"""
[[models]]
name = "gpt-mock"
provider = "openai"
base_url = "{openai_url}/v1"
api_key_env = "MESSAGES_TEST_OPENAI_KEY"

[[models]]
name = "claude"
provider = "anthropic"
model = "claude-mock"
base_url = "{claude_url}"
api_key_env = "MESSAGES_TEST_ANTHROPIC_KEY"
max_output_tokens = 1024
"""
        )
        with run_node(directory) as node:
            yield Served(node, openai_mock, claude)


def sdk(served: Served, key: str | None = None) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=served.url, api_key=key or served.key, max_retries=0)


@pytest.fixture
def client(served: Served) -> Iterator[anthropic.Anthropic]:
    with sdk(served) as client:
        yield client


def admin(served: Served) -> httpx.Client:
    return httpx.Client(
        base_url=served.url, headers={"authorization": f"Bearer {served.key}"}, timeout=30
    )


def new_key(served: Served, **fields: Any) -> tuple[str, str]:
    with admin(served) as client:
        response = client.post("/admin/keys", json={"name": "k", **fields})
    assert response.status_code == 201, response.text
    body = response.json()
    return body["key"], body["record"]["id"]


def events(served: Served, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The raw SSE events of a streamed Messages request: (event name, data)."""
    headers = {"x-api-key": served.key, "anthropic-version": "2023-06-01"}
    with (
        httpx.Client(base_url=served.url, timeout=30) as client,
        client.stream("POST", "/v1/messages", json=body, headers=headers) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    found = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        found.append((lines["event"], json.loads(lines["data"])))
    return found


# --- answers -------------------------------------------------------------------------------


def test_create_with_a_system_prompt(client):
    raw = client.messages.with_raw_response.create(
        model="echo", max_tokens=64, system="be brief", messages=HELLO
    )
    reply = raw.parse()
    assert reply.type == "message" and reply.role == "assistant"
    assert [block.type for block in reply.content] == ["text"]
    assert reply.content[0].text == "echo: Hello, hub"
    assert reply.stop_reason == "end_turn" and reply.stop_sequence is None
    assert reply.usage.output_tokens == 3 and reply.usage.input_tokens > 0
    request_id = raw.headers["aihub-request-id"]
    assert reply.id == "msg_" + request_id.removeprefix("req_")
    assert int(raw.headers["aihub-cost-micros"]) > 0


def test_create_through_an_openai_upstream_sends_it_openai_fields_only(client, served):
    reply = client.messages.create(
        model="gpt-mock",
        max_tokens=50,
        system=[{"type": "text", "text": "be kind"}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi there"}]}],
        stop_sequences=["END"],
        metadata={"user_id": "u-1"},
        # Sampling settings this SDK version no longer types: sent as the API still reads them.
        extra_body={"temperature": 0.5, "top_k": 3, "thinking": {"type": "disabled"}},
    )
    assert reply.content[0].text == "mock says: hi there"
    assert reply.usage.output_tokens == 4
    sent = json.loads(served.openai_mock.script.received[-1].body)
    assert sent["messages"] == [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": [{"type": "text", "text": "hi there"}]},
    ]
    assert sent["max_tokens"] == 50 and sent["stop"] == ["END"] and sent["user"] == "u-1"
    assert sent["temperature"] == 0.5
    assert not {"system", "stop_sequences", "top_k", "metadata"} & set(sent)


def test_a_system_message_among_the_turns_is_a_system_message(client, served):
    """Claude Code sends its environment as a message of role `system` after the first turn."""
    turns = [
        {"role": "user", "content": [{"type": "text", "text": "hi there"}]},
        {"role": "system", "content": [{"type": "text", "text": "# Environment"}]},
    ]
    reply = client.messages.create(model="gpt-mock", max_tokens=20, messages=turns)
    assert reply.content[0].text == "mock says: hi there"
    sent = json.loads(served.openai_mock.script.received[-1].body)
    assert sent["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "hi there"}]},
        {"role": "system", "content": "# Environment"},
    ]


def test_an_image_block_reaches_an_openai_upstream_as_an_image_part(client, served):
    pixel = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(16)).decode()
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": pixel},
    }
    reply = client.messages.create(
        model="gpt-mock",
        max_tokens=20,
        messages=[{"role": "user", "content": [image, {"type": "text", "text": "what is it"}]}],
    )
    assert reply.content[0].text == "mock says: what is it"
    sent = json.loads(served.openai_mock.script.received[-1].body)
    assert sent["messages"][0]["content"] == [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{pixel}"}},
        {"type": "text", "text": "what is it"},
    ]


def test_max_tokens_is_the_stop_reason_when_the_answer_is_cut(client):
    reply = client.messages.create(
        model="claude", max_tokens=2, messages=[{"role": "user", "content": "one two three"}]
    )
    assert reply.stop_reason == "max_tokens" and reply.usage.output_tokens == 2


# --- streams -------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["echo", "gpt-mock", "claude"])
def test_stream_text_and_final_message(client, model):
    with client.messages.stream(
        model=model, max_tokens=64, messages=[{"role": "user", "content": "stream please"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    expected = "echo: stream please" if model == "echo" else "mock says: stream please"
    assert text == expected
    assert final.content[0].text == expected
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0 and final.usage.input_tokens > 0
    assert final.id.startswith("msg_")


def test_stream_is_anthropics_event_sequence(served):
    body = {"model": "gpt-mock", "max_tokens": 64, "messages": HELLO, "stream": True}
    seen = events(served, body)
    names = [name for name, _ in seen]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert all(data["type"] == name for name, data in seen)
    start = seen[0][1]["message"]
    assert start["role"] == "assistant" and start["content"] == [] and start["stop_reason"] is None
    assert seen[2][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    deltas = [data["delta"] for name, data in seen if name == "content_block_delta"]
    assert all(delta["type"] == "text_delta" for delta in deltas)
    assert "".join(delta["text"] for delta in deltas) == "mock says: Hello, hub"
    closing = seen[-2][1]
    assert closing["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert closing["usage"]["output_tokens"] == 4  # the upstream's count, not an estimate


def test_a_failure_mid_stream_is_an_error_event(served):
    served.claude.fail_stream_next("overloaded_error", "Overloaded", after=4)
    body = {"model": "claude", "max_tokens": 64, "messages": HELLO, "stream": True}
    seen = events(served, body)
    assert seen[0][0] == "message_start"
    name, data = seen[-1]
    assert name == "error" and data["type"] == "error"
    assert data["error"]["message"].endswith("Overloaded")
    assert data["error"]["type"] in ("overloaded_error", "api_error")


# --- tools -----------------------------------------------------------------------------------


def test_tool_round_trip_through_an_openai_upstream(client, served):
    question = {"role": "user", "content": "weather in Paris?"}
    called = client.messages.create(
        model="gpt-mock", max_tokens=100, tools=[WEATHER], messages=[question]
    )
    assert called.stop_reason == "tool_use"
    (use,) = [block for block in called.content if block.type == "tool_use"]
    assert use.name == "get_weather" and use.input == {"city": "Paris"}
    sent = json.loads(served.openai_mock.script.received[-1].body)
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": WEATHER["input_schema"],
            },
        }
    ]
    result = {"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21°C"}
    answered = client.messages.create(
        model="gpt-mock",
        max_tokens=100,
        tools=[WEATHER],
        tool_choice={"type": "none"},
        messages=[
            question,
            {"role": "assistant", "content": called.content},
            {"role": "user", "content": [result, {"type": "text", "text": "thanks"}]},
        ],
    )
    assert answered.stop_reason == "end_turn"
    assert answered.content[0].text == "mock says: thanks"
    sent = json.loads(served.openai_mock.script.received[-1].body)
    assert sent["tool_choice"] == "none"
    assert sent["messages"][1:] == [
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    "id": use.id,
                }
            ],
        },
        {"role": "tool", "content": "sunny, 21°C", "tool_call_id": use.id},
        {"role": "user", "content": [{"type": "text", "text": "thanks"}]},
    ]


def test_streamed_tool_round_trip_through_an_anthropic_upstream(client):
    question = {"role": "user", "content": "weather in Paris?"}
    with client.messages.stream(
        model="claude",
        max_tokens=100,
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[question],
    ) as stream:
        called = stream.get_final_message()
    assert called.stop_reason == "tool_use"
    assert [block.type for block in called.content] == ["tool_use"]
    use = called.content[0]
    assert use.name == "get_weather" and use.input == {"city": "Paris"}
    # The mock refuses a tool_result whose id no tool_use of the turn before has.
    result = {"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}
    answered = client.messages.create(
        model="claude",
        max_tokens=100,
        tools=[WEATHER],
        messages=[
            question,
            {"role": "assistant", "content": called.content},
            {"role": "user", "content": [result]},
        ],
    )
    assert answered.stop_reason == "end_turn"
    assert answered.content[0].text == "mock says: sunny"


def test_anthropic_version_and_beta_reach_an_anthropic_upstream(served):
    """What the client opts into is what the upstream is asked for, plain and streamed;
    other headers the client sends stay at the node."""
    sent = {"anthropic-version": "2023-01-01", "anthropic-beta": "prompt-caching-2024-07-31"}
    headers = {**sent, "x-secret": "not for upstreams"}
    with anthropic.Anthropic(
        base_url=served.url, api_key=served.key, max_retries=0, default_headers=headers
    ) as client:
        client.messages.create(model="claude", max_tokens=16, messages=HELLO)
        plain = served.claude.script.received[-1].headers
        with client.messages.stream(model="claude", max_tokens=16, messages=HELLO) as stream:
            stream.get_final_message()
        streamed = served.claude.script.received[-1].headers
    for got in (plain, streamed):
        assert {name: got.get(name) for name in sent} == sent
        assert "x-secret" not in got


def test_without_anthropic_headers_the_adapter_default_version_is_sent(served):
    body = {"model": "claude", "max_tokens": 16, "messages": HELLO}
    headers = {"authorization": f"Bearer {served.key}", "anthropic-beta": "x" * 300}
    response = httpx.post(f"{served.url}/v1/messages", json=body, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    got = served.claude.script.received[-1].headers
    assert got["anthropic-version"] == "2023-06-01"
    assert "anthropic-beta" not in got  # an unbounded value is not passed on


def test_streamed_tool_call_events(served):
    body = {
        "model": "gpt-mock",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "weather?"}],
        "tools": [WEATHER],
        "stream": True,
    }
    seen = events(served, body)
    starts = [data for name, data in seen if name == "content_block_start"]
    assert [block["content_block"]["type"] for block in starts] == ["tool_use"]
    assert starts[0]["content_block"]["name"] == "get_weather"
    partial = "".join(
        data["delta"]["partial_json"]
        for name, data in seen
        if name == "content_block_delta" and data["delta"]["type"] == "input_json_delta"
    )
    assert json.loads(partial) == {"city": "Paris"}
    assert seen[-2][1]["delta"]["stop_reason"] == "tool_use"


# --- count_tokens, keys and errors -----------------------------------------------------------


def test_count_tokens_is_the_gateways_estimate(client):
    counted = client.messages.count_tokens(model="echo", system="be brief", messages=HELLO)
    reply = client.messages.create(model="echo", max_tokens=64, system="be brief", messages=HELLO)
    assert counted.input_tokens == reply.usage.input_tokens > 0
    with_tools = client.messages.count_tokens(model="echo", messages=HELLO, tools=[WEATHER])
    plain = client.messages.count_tokens(model="echo", messages=HELLO)
    assert with_tools.input_tokens > plain.input_tokens
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="nope", messages=HELLO)
    with pytest.raises(anthropic.AuthenticationError):
        sdk_with_bad_key = anthropic.Anthropic(
            base_url=client.base_url, api_key="sk-hub-wrong", max_retries=0
        )
        sdk_with_bad_key.messages.count_tokens(model="echo", messages=HELLO)


def test_x_api_key_and_bearer_token_both_authenticate(served):
    body = {"model": "echo", "max_tokens": 8, "messages": HELLO}
    with httpx.Client(base_url=served.url, timeout=30) as client:
        # Anthropic's own header, as its API and older SDKs send the key.
        ok = client.post("/v1/messages", json=body, headers={"x-api-key": served.key})
        assert ok.status_code == 200 and ok.json()["content"][0]["text"] == "echo: Hello, hub"
        wrong = client.post("/v1/messages", json=body, headers={"x-api-key": "sk-hub-wrong"})
        assert wrong.status_code == 401
        assert wrong.json()["error"]["type"] == "authentication_error"
        missing = client.post("/v1/messages", json=body)
        assert missing.status_code == 401
    # The SDK's `auth_token` (a bearer token).
    bearer = anthropic.Anthropic(base_url=served.url, auth_token=served.key, max_retries=0)
    assert "Authorization" in bearer.auth_headers
    assert bearer.messages.create(model="echo", max_tokens=8, messages=HELLO).content


def test_errors_are_anthropic_errors_the_sdk_raises(served, client):
    with pytest.raises(anthropic.AuthenticationError) as bad_key:
        sdk(served, "sk-hub-wrong").messages.create(model="echo", max_tokens=8, messages=HELLO)
    assert bad_key.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="nope", max_tokens=8, messages=HELLO)
    assert missing.value.body == {
        "type": "error",
        "error": {
            "type": "not_found_error",
            "message": "The model `nope` does not exist on this node",
        },
    }
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(
            model="echo", max_tokens=8, messages=HELLO, extra_body={"temperature": 1.5}
        )
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    assert "temperature" in bad.value.body["error"]["message"]
    with pytest.raises(anthropic.PermissionDeniedError):
        key, _ = new_key(served, models=["gpt-mock"])
        sdk(served, key).messages.create(model="echo", max_tokens=8, messages=HELLO)


def test_a_tool_choice_of_no_tool_and_the_schema(client, served):
    with pytest.raises(anthropic.BadRequestError) as unnamed:
        client.messages.create(
            model="echo",
            max_tokens=8,
            messages=HELLO,
            tools=[WEATHER],
            tool_choice={"type": "tool"},
        )
    assert "names its tool" in unnamed.value.body["error"]["message"]
    schema = httpx.get(served.url + "/schema/openapi.json").json()
    assert schema["paths"]["/v1/messages"]["post"]["operationId"] == "createMessage"
    assert "/v1/messages/count_tokens" in schema["paths"]


def test_over_budget_key_is_a_rate_limit_error(served):
    key, _ = new_key(served, budget_micros=1)
    with pytest.raises(anthropic.RateLimitError) as refused:
        sdk(served, key).messages.create(model="echo", max_tokens=8, messages=HELLO)
    assert refused.value.body["error"]["type"] == "rate_limit_error"


@pytest.mark.parametrize(
    ("method", "body", "status", "type_"),
    [
        ("POST", b"{not json", 400, "invalid_request_error"),
        ("POST", b"", 400, "invalid_request_error"),
        ("POST", b'{"model": "echo", "messages": []}', 400, "invalid_request_error"),
        ("GET", b"", 405, "invalid_request_error"),
        ("POST", b"x" * (5 << 20), 413, "request_too_large"),
    ],
)
def test_http_layer_errors_are_anthropic_shaped(served, method, body, status, type_):
    headers = {"x-api-key": served.key, "content-type": "application/json"}
    with httpx.Client(base_url=served.url, timeout=30) as client:
        for path in ("/v1/messages", "/v1/messages?beta=true"):
            response = client.request(method, path, content=body, headers=headers)
            assert response.status_code == status, response.text
            error = response.json()
            assert error["type"] == "error" and error["error"]["type"] == type_
            assert isinstance(error["error"]["message"], str)


# --- the books -------------------------------------------------------------------------------


def test_a_messages_request_is_charged_to_its_key(served):
    key, key_id = new_key(served, budget_micros=1_000_000)
    with sdk(served, key) as client:
        raw = client.messages.with_raw_response.create(model="echo", max_tokens=8, messages=HELLO)
        with client.messages.stream(model="echo", max_tokens=8, messages=HELLO) as stream:
            stream.until_done()
    cost = int(raw.headers["aihub-cost-micros"])
    reply = raw.parse()
    with admin(served) as client:
        report = client.get("/admin/usage", params={"by": "key", "since": "1h"}).json()
        spent = client.get(f"/admin/keys/{key_id}").json()["spend"]
    (row,) = [row for row in report["data"] if row["group"] == key_id]
    assert row["requests"] == 2 and row["errors"] == 0
    assert row["tokens_in"] == 2 * reply.usage.input_tokens
    assert row["tokens_out"] == 2 * reply.usage.output_tokens
    assert row["cost_micros"] == 2 * cost
    assert spent["spent_micros"] == 2 * cost


# --- through a peer ----------------------------------------------------------------------------


def test_messages_through_a_peer(tmp_path):
    """Bob's Messages client uses a model only alice serves: bob calls alice through chat
    completions (peers speak that), and renders her answer in Anthropic's format; alice
    charges bob's cross-node key for both."""
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    with alice.run(), bob.run() as b:
        cli("join", invite(alice, "--models", "llama3"), "--data-dir", str(bob.path))
        assert wait_for(lambda: model_owners(b).get("llama3") == "alice")
        with anthropic.Anthropic(base_url=b.url, api_key=b.key, max_retries=0) as client:
            reply = client.messages.create(model="llama3", max_tokens=32, messages=HELLO)
            with client.messages.stream(model="llama3", max_tokens=32, messages=HELLO) as stream:
                text = "".join(stream.text_stream)
                final = stream.get_final_message()
        assert reply.content[0].text == text == "echo: Hello, hub"
        assert reply.stop_reason == final.stop_reason == "end_turn"
        assert final.usage.output_tokens == reply.usage.output_tokens == 3
        assert wait_for(lambda: len([r for r in usage_rows(alice.path) if r.status == 200]) == 2)
        served = [r for r in usage_rows(alice.path) if r.model == "llama3"]
        assert len({r.key_id for r in served}) == 1 and all(r.cost_micros > 0 for r in served)
        assert wait_for(
            lambda: len([r for r in usage_rows(bob.path) if r.deployment == "llama3@alice"]) == 2
        )


def test_blocks_chat_has_no_place_for_are_left_out_and_bad_blocks_are_400s(client, served):
    """A server tool's blocks (Anthropic ran a web search) in an earlier turn reach a
    non-Anthropic model as the turn's text alone; a block that is not what its type says is
    a 400 that names it."""
    turns = [
        {"role": "user", "content": "search the weather"},
        {
            "role": "assistant",
            "content": [
                {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}},
                {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
                {"type": "text", "text": "It is sunny."},
            ],
        },
        {"role": "user", "content": "thanks"},
    ]
    reply = client.messages.create(model="gpt-mock", max_tokens=20, messages=turns)
    assert reply.content[0].text == "mock says: thanks"
    sent = json.loads(served.openai_mock.script.received[-1].body)
    assert sent["messages"][1] == {"role": "assistant", "content": "It is sunny."}
    headers = {"x-api-key": served.key}
    for bad, param in (
        ({"type": "image", "source": {"type": "base64"}}, "messages[0].content[0].source"),
        ("just a string", "messages[0].content[0]"),
        ({"no": "type"}, "messages[0].content[0]"),
    ):
        body = {
            "model": "gpt-mock",
            "max_tokens": 8,
            "messages": [{"role": "user", "content": [bad]}],
        }
        response = httpx.post(f"{served.url}/v1/messages", json=body, headers=headers)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["message"].startswith(param), error["message"]
