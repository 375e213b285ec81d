"""Native pass-through, with the official SDKs against a real node: a Messages request served
by an Anthropic deployment, and a Responses request served by a deployment whose upstream
speaks the Responses API (`responses = true`), reach their upstream as the client wrote them
and come back as the upstream answered, while the node keeps the books (usage read from the
answer, untrusted) and the Responses conversation (`previous_response_id` expanded by the
node, `store: false` upstream).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import msgspec
import openai
import pytest

from node.config import Config, semantic_problems
from node.provision import create_node
from tests.conftest import NodeDir, RunningNode, run_node
from tests.mocks.anthropic_mock import API_ERROR, SIGNATURE, THOUGHT, AnthropicMock
from tests.mocks.anthropic_mock import OVERLOADED as CLAUDE_OVERLOADED
from tests.mocks.openai_mock import OpenAIMock, openai_error
from tests.mocks.script import Failure
from tests.mocks.server import serve_app
from tests.test_federation import usage_rows, wait_for

CLAUDE_KEY = "sk-ant-native"
OPENAI_KEY = "sk-openai-native"
HELLO = [{"role": "user", "content": "Hello, hub"}]
MAX_EVENT = 64 * 1024
CAP = 4096  # the Anthropic deployment's output cap
RESPONSES_CAP = 256  # the Responses deployment's
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


class Served:
    def __init__(self, node: RunningNode, claude: AnthropicMock, gpt: OpenAIMock) -> None:
        self.node = node
        self.url = node.url
        self.key = node.key
        self.claude = claude
        self.gpt = gpt

    def claude_sent(self) -> dict[str, Any]:
        return json.loads(self.claude.script.received[-1].body)

    def gpt_sent(self) -> tuple[str, dict[str, Any]]:
        last = self.gpt.script.received[-1]
        return last.path, json.loads(last.body)

    def rows(self, request_id: str) -> list[Any]:
        return [row for row in usage_rows(self.node.dir.path) if row.request_id == request_id]

    def row(self, request_id: str) -> Any:
        assert wait_for(lambda: len(self.rows(request_id)) == 1), request_id
        return self.rows(request_id)[0]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder: Path = tmp_path_factory.mktemp("native") / "node"
    _, key = create_node(folder, "native-node")
    claude = AnthropicMock(models=("claude-mock",), api_key=CLAUDE_KEY)
    gpt = OpenAIMock(api_key=OPENAI_KEY)
    os.environ["NATIVE_TEST_CLAUDE_KEY"] = CLAUDE_KEY
    os.environ["NATIVE_TEST_OPENAI_KEY"] = OPENAI_KEY
    with serve_app(claude) as claude_url, serve_app(gpt) as gpt_url:
        directory = NodeDir(folder, key)
        directory.set_config("max_event_bytes = 1_048_576", f"max_event_bytes = {MAX_EVENT}")
        directory.add_config(
            f"""
[[models]]
name = "claude"
provider = "anthropic"
model = "claude-mock"
base_url = "{claude_url}"
api_key_env = "NATIVE_TEST_CLAUDE_KEY"
max_output_tokens = {CAP}
price_in = 3_000_000
price_out = 15_000_000

[[models]]
name = "gpt-resp"
provider = "openai"
model = "gpt-mock-large"
base_url = "{gpt_url}/v1"
api_key_env = "NATIVE_TEST_OPENAI_KEY"
responses = true
max_output_tokens = {RESPONSES_CAP}
price_in = 1_000_000
price_out = 2_000_000

[[models]]
name = "azure-resp"
provider = "azure"
model = "my-gpt-deployment"
base_url = "{gpt_url}"
api_key_env = "NATIVE_TEST_OPENAI_KEY"
responses = true

# One name, two deployments: Anthropic first, an OpenAI-compatible one behind it.
[[models]]
name = "mixed"
provider = "anthropic"
model = "claude-mock"
base_url = "{claude_url}"
api_key_env = "NATIVE_TEST_CLAUDE_KEY"
priority = 0

[[models]]
name = "mixed"
provider = "openai"
model = "gpt-mock-large"
base_url = "{gpt_url}/v1"
api_key_env = "NATIVE_TEST_OPENAI_KEY"
priority = 1

[[models]]
name = "gpt-chat"
provider = "openai"
model = "gpt-mock-large"
base_url = "{gpt_url}/v1"
api_key_env = "NATIVE_TEST_OPENAI_KEY"
max_output_tokens = {RESPONSES_CAP}
"""
        )
        with run_node(directory) as node:
            yield Served(node, claude, gpt)


@pytest.fixture(autouse=True)
def fresh_mocks(served: Served) -> Iterator[None]:
    yield
    served.claude.reset()
    served.gpt.script = type(served.gpt.script)()
    served.gpt.responses_usage = None
    served.gpt.responses_padding = 0


@pytest.fixture
def claude(served: Served) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=served.url, api_key=served.key, max_retries=0) as client:
        yield client


@pytest.fixture
def gpt(served: Served) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=served.url + "/v1", api_key=served.key, max_retries=0) as client:
        yield client


def raw_events(served: Served, path: str, body: dict[str, Any]) -> list[tuple[str, Any]]:
    headers = {"authorization": f"Bearer {served.key}"}
    with (
        httpx.Client(base_url=served.url, timeout=30) as client,
        client.stream("POST", path, json=body, headers=headers) as response,
    ):
        assert response.status_code == 200, response.read()
        text = response.read().decode()
    found = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        found.append((lines["event"], json.loads(lines["data"])))
    return found


THINKING = {"type": "enabled", "budget_tokens": 1024}
THINKING_REQUEST: dict[str, Any] = {
    "model": "claude",
    "max_tokens": 2000,
    "system": [
        {"type": "text", "text": "You cite.", "cache_control": {"type": "ephemeral"}},
    ],
    "messages": [
        {
            "role": "user",
            "content": [
                {
                    "type": "document",
                    "source": {"type": "text", "media_type": "text/plain", "data": "Sky is blue."},
                    "title": "Facts",
                    "citations": {"enabled": True},
                },
                {"type": "text", "text": "what colour?", "cache_control": {"type": "ephemeral"}},
            ],
        }
    ],
    "metadata": {"user_id": "u-7"},
    "thinking": {"type": "enabled", "budget_tokens": 1024},
}


# --- Messages → an Anthropic deployment ------------------------------------------------------


def test_a_messages_request_reaches_anthropic_as_the_client_wrote_it(claude, served):
    fields = dict(THINKING_REQUEST)
    raw = claude.messages.with_raw_response.create(**fields, extra_body={"top_k": 5})
    reply = raw.parse()
    # Anthropic's answer, as it came: its own id, its thinking with the signature, citations.
    assert reply.id.startswith("msg_mock")
    assert [block.type for block in reply.content] == ["thinking", "text"]
    assert reply.content[0].thinking == THOUGHT and reply.content[0].signature == SIGNATURE
    assert reply.content[1].citations[0].cited_text == "Sky is blue."
    sent = served.claude_sent()
    assert sent["model"] == "claude-mock" and sent["max_tokens"] == 2000
    assert sent["top_k"] == 5 and sent["metadata"] == {"user_id": "u-7"}
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert sent["system"] == THINKING_REQUEST["system"]
    assert sent["messages"] == THINKING_REQUEST["messages"]
    row = served.row(raw.headers["aihub-request-id"])
    assert (row.tokens_in, row.tokens_out) == (reply.usage.input_tokens, reply.usage.output_tokens)
    assert row.status == 200 and not row.estimated and row.deployment.startswith("claude#")
    assert int(raw.headers["aihub-cost-micros"]) == row.cost_micros > 0


def test_thinking_is_handed_back_and_max_tokens_is_held_to_the_cap(claude, served):
    first = claude.messages.create(**THINKING_REQUEST)
    follow = claude.messages.create(
        model="claude",
        max_tokens=100_000,
        timeout=60,
        messages=[
            *THINKING_REQUEST["messages"],
            {"role": "assistant", "content": first.content},
            {"role": "user", "content": "and at night?"},
        ],
        thinking={"type": "enabled", "budget_tokens": 1024},
    )
    assert follow.content[-1].text == "mock says: and at night?"
    sent = served.claude_sent()
    assert sent["max_tokens"] == CAP  # what the budget reserved, at most
    assert sent["messages"][1]["content"][0] == {
        "type": "thinking",
        "thinking": THOUGHT,
        "signature": SIGNATURE,
    }


def test_a_stream_is_anthropics_own_events(claude, served):
    with claude.messages.stream(**THINKING_REQUEST) as stream:
        final = stream.get_final_message()
    assert [block.type for block in final.content] == ["thinking", "text"]
    assert final.content[0].signature == SIGNATURE
    assert final.content[1].citations[0].cited_text == "Sky is blue."
    assert final.content[1].text == "mock says: what colour?"
    seen = raw_events(served, "/v1/messages", {**THINKING_REQUEST, "stream": True})
    names = [name for name, _ in seen]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == [
        "message_delta",
        "message_stop",
    ]
    deltas = {data["delta"]["type"] for name, data in seen if name == "content_block_delta"}
    assert deltas == {"thinking_delta", "signature_delta", "citations_delta", "text_delta"}
    assert seen[0][1]["message"]["id"].startswith("msg_mock")  # the upstream's, unchanged


def test_a_streamed_answer_is_charged_by_anthropics_counts(claude, served):
    with claude.messages.with_streaming_response.create(
        model="claude", max_tokens=64, messages=HELLO, stream=True
    ) as response:
        request_id = response.headers["aihub-request-id"]
        body = response.read().decode()
    assert "message_stop" in body
    row = served.row(request_id)
    # The mock counts "Hello, hub" as 2 words + 3, and writes 4 words.
    assert (row.tokens_in, row.tokens_out, row.estimated, row.stream) == (5, 4, False, True)


def test_an_overload_before_the_first_content_is_retried_unseen(claude, served):
    """Overloaded right after `message_start`: that event was held back, so the call can be
    retried (or fall back) and the client sees one whole message, not half of one."""
    served.claude.script.fail_next(CLAUDE_OVERLOADED)
    reply = claude.messages.create(model="claude", max_tokens=16, messages=HELLO)
    assert reply.content[0].text == "mock says: Hello, hub"
    served.claude.fail_stream_next("overloaded_error", "Overloaded", after=1)
    body = {"model": "claude", "max_tokens": 16, "messages": HELLO, "stream": True}
    seen = raw_events(served, "/v1/messages", body)
    names = [name for name, _ in seen]
    assert names.count("message_start") == 1 and names[-1] == "message_stop"
    assert "error" not in names


@pytest.mark.parametrize("stream", [False, True])
def test_a_plan_mixes_pass_through_and_translation(claude, served, stream):
    """The Anthropic deployment fails on every try (and then rests a while): the next
    deployment of the name, an OpenAI-compatible one, serves the same Messages request,
    translated, and the client cannot tell but for what chat has no place for."""
    served.claude.script.fail_next(API_ERROR, times=3)  # the first try and its two retries
    ask = {"model": "mixed", "max_tokens": 64, "messages": HELLO, "thinking": THINKING}
    if stream:
        with claude.messages.stream(**ask) as events:
            reply = events.get_final_message()
    else:
        reply = claude.messages.create(**ask)
    assert [block.type for block in reply.content] == ["text"]
    assert reply.content[0].text == "mock says: Hello, hub"
    path, sent = served.gpt_sent()
    assert path == "/v1/chat/completions" and "thinking" not in sent


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("lie", [10**12, "lots", -3])
def test_lying_usage_from_anthropic_is_never_charged_past_the_worst_case(served, stream, lie):
    served.claude.usage = {"output_tokens": lie, "input_tokens": lie}
    body = {"model": "claude", "max_tokens": 64, "messages": HELLO, "stream": stream}
    headers = {"x-api-key": served.key}
    response = httpx.post(f"{served.url}/v1/messages", json=body, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert ("message_stop" in response.text) if stream else response.json()["content"]
    row = served.row(response.headers["aihub-request-id"])
    assert row.status == 200
    assert 0 <= row.tokens_out <= 64
    assert row.estimated or row.clamped


def test_an_oversized_event_and_a_cut_stream_end_in_an_error_event(served):
    huge = {
        **THINKING_REQUEST,
        "stream": True,
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "document",
                        "source": {
                            "type": "text",
                            "media_type": "text/plain",
                            "data": "x" * (2 * MAX_EVENT),
                        },
                        "citations": {"enabled": True},
                    },
                    {"type": "text", "text": "cite"},
                ],
            }
        ],
    }
    seen = raw_events(served, "/v1/messages", huge)
    assert seen[-1][0] == "error" and "message_stop" not in [name for name, _ in seen]
    served.claude.script.cut_stream_after = 5
    body = {"model": "claude", "max_tokens": 64, "messages": HELLO, "stream": True}
    seen = raw_events(served, "/v1/messages", body)
    assert seen[-1][0] == "error" and seen[-1][1]["error"]["message"].endswith("ended early")
    assert all(name != "message_stop" for name, _ in seen)


@pytest.mark.parametrize("answer", [b"not json", b"[1, 2]", b'{"usage": "none"}'])
def test_an_answer_that_is_no_message_is_a_502_in_anthropics_shape(served, answer):
    served.claude.script.fail_next(Failure(200, answer), times=3)
    body = {"model": "claude", "max_tokens": 16, "messages": HELLO}
    headers = {"x-api-key": served.key}
    response = httpx.post(f"{served.url}/v1/messages", json=body, headers=headers, timeout=30)
    assert response.status_code == 502, response.text
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "api_error"


def test_an_anthropic_error_is_the_clients_error(claude, served):
    with pytest.raises(anthropic.BadRequestError) as refused:
        # The mock, like Anthropic, wants `max_tokens` above the thinking budget.
        claude.messages.create(
            model="claude",
            max_tokens=1024,
            messages=HELLO,
            thinking={"type": "enabled", "budget_tokens": 1024},
        )
    assert "budget_tokens" in refused.value.body["error"]["message"]


# --- Responses → a deployment that speaks the Responses API ----------------------------------


def test_a_responses_request_reaches_a_responses_upstream(gpt, served):
    raw = gpt.responses.with_raw_response.create(
        model="gpt-resp",
        input="Hello, hub",
        instructions="be brief",
        reasoning={"effort": "low"},
        max_output_tokens=50,
        metadata={"trace": "t9"},
        extra_body={"truncation": "auto", "background": True, "conversation": "conv_other"},
    )
    response = raw.parse()
    request_id = raw.headers["aihub-request-id"]
    assert response.id == "resp_" + request_id.removeprefix("req_")
    assert response.output_text == "mock says: Hello, hub"
    assert response.store is True and response.metadata == {"trace": "t9"}
    assert response.usage.output_tokens_details.reasoning_tokens == 5
    assert [item.type for item in response.output] == ["reasoning", "message"]
    path, sent = served.gpt_sent()
    assert path == "/v1/responses"
    assert sent["model"] == "gpt-mock-large" and sent["store"] is False
    assert sent["max_output_tokens"] == 50 and sent["truncation"] == "auto"
    assert sent["reasoning"] == {"effort": "low"} and sent["instructions"] == "be brief"
    assert "background" not in sent and "conversation" not in sent
    row = served.row(request_id)
    assert (row.tokens_in, row.tokens_out) == (
        response.usage.input_tokens,
        response.usage.output_tokens,
    )
    assert not row.estimated and row.deployment.startswith("gpt-resp#")
    kept = gpt.responses.retrieve(response.id)
    assert kept.output_text == response.output_text and kept.id == response.id


def test_the_node_expands_the_conversation_and_the_upstream_keeps_nothing(gpt, served):
    first = gpt.responses.create(
        model="gpt-resp", input="what is the weather?", tools=[WEATHER], reasoning={"effort": "low"}
    )
    (call,) = [item for item in first.output if item.type == "function_call"]
    answered = gpt.responses.create(
        model="gpt-resp",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        tools=[WEATHER],
    )
    assert answered.output_text == "mock says: sunny"
    assert answered.previous_response_id == first.id
    _, sent = served.gpt_sent()
    assert "previous_response_id" not in sent and sent["store"] is False
    # The whole conversation, without ids the upstream never kept, and without the reasoning
    # item it could not read back without its encrypted content.
    assert [item.get("type", "message") for item in sent["input"]] == [
        "message",
        "function_call",
        "function_call_output",
    ]
    assert not any("id" in item for item in sent["input"])
    # The same conversation goes on through a deployment that is translated into chat.
    third = gpt.responses.create(model="gpt-chat", previous_response_id=answered.id, input="ok?")
    assert third.output_text == "mock says: ok?"
    path, chat = served.gpt_sent()
    assert path == "/v1/chat/completions"
    assert [m["role"] for m in chat["messages"]] == [
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
    ]


def test_a_stream_is_the_upstreams_own_events_and_is_kept(gpt, served):
    with gpt.responses.stream(model="gpt-resp", input="stream it") as stream:
        final = stream.get_final_response()
    assert final.output_text == "mock says: stream it" and final.status == "completed"
    assert final.id.startswith("resp_") and not final.id.startswith("resp_mock")
    assert gpt.responses.retrieve(final.id).output_text == final.output_text
    seen = raw_events(served, "/v1/responses", {"model": "gpt-resp", "input": "hi", "stream": True})
    numbers = [data["sequence_number"] for _, data in seen]
    assert numbers == list(range(len(seen)))  # the upstream's, untouched
    assert seen[0][0] == "response.created" and seen[-1][0] == "response.completed"
    ids = {data["response"]["id"] for _, data in seen if "response" in data}
    (only,) = ids  # every snapshot names the node's response, not the upstream's
    assert only.startswith("resp_") and not only.startswith("resp_mock")
    assert seen[-1][1]["response"]["store"] is True
    follow = gpt.responses.create(model="gpt-resp", previous_response_id=final.id, input="more")
    assert follow.output_text == "mock says: more"


def test_a_stateless_client_hands_its_reasoning_back_as_it_got_it(gpt, served):
    """Codex's way: `store: false`, `include` the encrypted reasoning, and the whole
    conversation each turn, its reasoning items among it: they reach the upstream untouched
    (a translated model would have no place for them)."""
    first = gpt.responses.create(
        model="gpt-resp",
        input="plan it",
        reasoning={"effort": "low"},
        include=["reasoning.encrypted_content"],
        store=False,
    )
    reasoning = first.output[0]
    assert reasoning.type == "reasoning" and reasoning.encrypted_content == "gAAAAmock"
    history = [item.model_dump(exclude_none=True) for item in first.output]
    for item in history:
        if item["type"] == "message":
            del item["id"]  # OpenAI cannot find what it never kept; the client knows that
    follow = gpt.responses.create(
        model="gpt-resp",
        input=[{"role": "user", "content": "plan it"}, *history, {"role": "user", "content": "go"}],
        reasoning={"effort": "low"},
        include=["reasoning.encrypted_content"],
        store=False,
    )
    assert follow.output_text == "mock says: go" and follow.store is False
    _, sent = served.gpt_sent()
    assert sent["input"][1] == history[0]  # the reasoning item, id and encrypted content
    with pytest.raises(openai.NotFoundError):
        gpt.responses.retrieve(follow.id)  # `store: false`: the node kept nothing either


def test_an_azure_deployment_is_reached_at_its_v1_responses(gpt, served):
    with gpt.responses.stream(model="azure-resp", input="Hello, azure") as stream:
        final = stream.get_final_response()
    assert final.output_text == "mock says: Hello, azure"
    last = served.gpt.script.received[-1]
    assert last.path == "/openai/v1/responses"
    assert last.headers["api-key"] == OPENAI_KEY and "authorization" not in last.headers
    assert json.loads(last.body)["model"] == "my-gpt-deployment"


def test_an_incomplete_answer_passes_through(gpt):
    response = gpt.responses.create(
        model="gpt-resp", input="one two three four", max_output_tokens=2
    )
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("lie", [10**12, "lots", -3])
def test_lying_responses_usage_is_never_charged_past_the_worst_case(served, stream, lie):
    served.gpt.responses_usage = {"input_tokens": lie, "output_tokens": lie, "total_tokens": 1}
    body = {"model": "gpt-resp", "input": "Hello, hub", "max_output_tokens": 20, "stream": stream}
    headers = {"authorization": f"Bearer {served.key}"}
    response = httpx.post(f"{served.url}/v1/responses", json=body, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    row = served.row(response.headers["aihub-request-id"])
    assert row.status == 200 and 0 <= row.tokens_out <= 20
    assert row.estimated or row.clamped


def test_an_oversized_or_cut_responses_stream_ends_in_an_error_event(gpt, served):
    served.gpt.responses_padding = 2 * MAX_EVENT
    seen = raw_events(served, "/v1/responses", {"model": "gpt-resp", "input": "hi", "stream": True})
    assert seen[-1][0] == "response.failed" and "response.completed" not in [n for n, _ in seen]
    assert [data["sequence_number"] for _, data in seen] == list(range(len(seen)))
    failed = seen[-1][1]["response"]
    assert failed["status"] == "failed" and "larger than" in failed["error"]["message"]
    assert failed["id"] == seen[0][1]["response"]["id"]
    served.gpt.responses_padding = 0
    served.gpt.script.cut_stream_after = 4
    seen = raw_events(served, "/v1/responses", {"model": "gpt-resp", "input": "hi", "stream": True})
    assert [name for name, _ in seen][:3] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
    ]
    assert seen[-1][0] == "response.failed"
    assert "ended early" in seen[-1][1]["response"]["error"]["message"]
    with gpt.responses.stream(model="gpt-resp", input="hi") as stream:
        kinds = [event.type for event in stream]
    assert kinds[-1] == "response.failed"


def test_a_responses_upstream_refusal_is_the_clients_error(gpt, served):
    served.gpt.script.fail_next(openai_error(400, "input: bad item", "invalid_request_error"))
    with pytest.raises(openai.BadRequestError) as refused:
        gpt.responses.create(model="gpt-resp", input="hi")
    assert "bad item" in refused.value.message


@pytest.mark.parametrize(
    ("provider", "kind"), [("anthropic", "chat"), ("ollama", "chat"), ("openai", "embeddings")]
)
def test_responses_is_only_for_openai_and_azure_chat_deployments(provider, kind):
    deployment = {"name": "m", "provider": provider, "kind": kind, "responses": True}
    config = msgspec.convert({"node": {"name": "n"}, "models": [deployment]}, Config)
    assert any("responses is for" in problem for problem in semantic_problems(config))
