"""The OpenAI Responses API (`POST /v1/responses`), through the official `openai` SDK against
a real running node: the echo model, and a mock OpenAI-compatible upstream (which gets chat
completions) for tool calls and structured output."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel, TypeAdapter

from node.config import DATABASE_FILE
from node.provision import create_node
from tests.conftest import NodeDir, RunningNode, run_node
from tests.mocks.openai_mock import OpenAIMock, openai_error
from tests.mocks.server import serve_app
from tests.test_budgets import make_key
from tests.test_federation import LLAMA, cli, invite, make_peer, model_owners, usage_rows, wait_for

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}

_STREAM_EVENT: TypeAdapter[ResponseStreamEvent] = TypeAdapter(ResponseStreamEvent)


class Served:
    def __init__(self, node: RunningNode, mock: OpenAIMock, other_key: str) -> None:
        self.node = node
        self.mock = mock
        self.other_key = other_key  # another client's key, of the same node

    def sent(self) -> dict:
        """The chat completion request the upstream got last."""
        return json.loads(self.mock.script.received[-1].body)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder: Path = tmp_path_factory.mktemp("responses") / "node"
    _, key = create_node(folder, "responses-node")
    directory = NodeDir(folder, key)
    mock = OpenAIMock(api_key=None)
    with serve_app(mock) as upstream_url:
        directory.add_config(
            f"""
[[models]]
name = "gpt-mock"
provider = "openai"
model = "mock-large"
base_url = "{upstream_url}/v1"
price_in = 1_000_000
price_out = 2_000_000
"""
        )
        other_key, _ = make_key(folder, name="other")
        with run_node(directory) as node:
            yield Served(node, mock, other_key)


@pytest.fixture
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.node.url + "/v1", api_key=served.node.key, max_retries=0)


def test_plain_response_from_echo(client):
    response = client.responses.create(model="echo", input="Hello, hub", instructions="Be brief")
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status == "completed" and response.model == "echo"
    assert response.output_text == "echo: Hello, hub"
    message = response.output[0]
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "output_text"
    assert response.instructions == "Be brief"
    usage = response.usage
    assert usage.output_tokens == 3
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0


def test_input_items_become_the_chat_messages(client, served):
    response = client.responses.create(
        model="gpt-mock",
        instructions="You answer",
        input=[
            {"role": "user", "content": "first"},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "an answer", "annotations": []}],
            },
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "look"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
                ],
            },
        ],
        temperature=0.5,
        max_output_tokens=50,
        metadata={"trace": "t1"},
    )
    assert response.output_text == "mock says: look"
    assert response.metadata == {"trace": "t1"} and response.temperature == 0.5
    sent = served.sent()
    assert sent["model"] == "mock-large"
    assert sent["messages"] == [
        {"role": "system", "content": "You answer"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "an answer"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        },
    ]
    assert sent["temperature"] == 0.5 and sent["max_tokens"] == 50
    assert "input" not in sent and "metadata" not in sent


def test_stream_events_parse_and_end_with_usage(client):
    with client.responses.stream(model="echo", input="a b c") as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [event.type for event in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    for expected in (
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ):
        assert expected in types
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "echo: a b c" == final.output_text
    assert final.usage.output_tokens == 4 and final.status == "completed"
    assert final.id == events[0].response.id


def test_raw_stream_has_named_events_and_no_done(served):
    body = {"model": "gpt-mock", "input": "stream please", "stream": True}
    headers = {"authorization": f"Bearer {served.node.key}"}
    with httpx.stream(
        "POST", served.node.url + "/v1/responses", json=body, headers=headers
    ) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        assert reply.headers["aihub-request-id"].startswith("req_")
        raw = reply.read().decode()
    assert "[DONE]" not in raw
    frames = [frame for frame in raw.split("\n\n") if frame]
    for frame in frames:
        event, data = frame.split("\n")
        assert json.loads(data.removeprefix("data: "))["type"] == event.removeprefix("event: ")
    last = json.loads(frames[-1].split("\n")[1].removeprefix("data: "))
    assert last["type"] == "response.completed"
    assert last["response"]["usage"]["output_tokens"] == 4
    assert last["response"]["output"][0]["content"][0]["text"] == "mock says: stream please"


def test_function_tool_round_trip(client, served):
    question = [{"role": "user", "content": "weather in Paris?"}]
    first = client.responses.create(
        model="gpt-mock", input=question, tools=[WEATHER_TOOL], tool_choice="auto"
    )
    call = first.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id == "call_mock1" and json.loads(call.arguments) == {"city": "Paris"}
    assert first.tools[0].name == "get_weather"
    sent = served.sent()
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": WEATHER_TOOL["parameters"],
                "strict": True,
            },
        }
    ]
    assert sent["tool_choice"] == "auto"

    answer = client.responses.create(
        model="gpt-mock",
        input=[
            *question,
            *first.output,
            {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 21}'},
        ],
        tools=[WEATHER_TOOL],
        tool_choice="none",
    )
    assert answer.output_text == "mock says: weather in Paris?"
    messages = served.sent()["messages"]
    assert messages[1:] == [
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "type": "function",
                    "id": "call_mock1",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_mock1"},
    ]
    assert served.sent()["tool_choice"] == "none"


def test_streamed_function_call(client):
    with client.responses.stream(
        model="gpt-mock", input="weather?", tools=[WEATHER_TOOL]
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [event.type for event in events]
    assert "response.function_call_arguments.delta" in types
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert json.loads(done.arguments) == {"city": "Paris"}
    call = final.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}


# The tools Codex CLI sends besides its functions: run by its own runtime (or OpenAI's), which
# chat completions cannot offer. The gateway drops them rather than refuse the request.
CODEX_TOOLS = [
    {"type": "local_shell"},
    {"type": "custom", "name": "apply_patch", "description": "Edit files", "format": {}},
    {"type": "namespace", "name": "mcp", "tools": []},
    {"type": "web_search", "external_web_access": False},
]


def test_tools_a_coding_agent_runs_itself_are_dropped(client, served):
    response = client.responses.create(
        model="gpt-mock",
        input="hi agent",
        tools=[*CODEX_TOOLS, WEATHER_TOOL],
        tool_choice="none",
        parallel_tool_calls=False,
        store=False,
        include=["reasoning.encrypted_content"],
        reasoning={"effort": "low"},
    )
    assert response.output_text == "mock says: hi agent"
    assert [tool.name for tool in response.tools] == ["get_weather"]
    sent = served.sent()
    assert [tool["function"]["name"] for tool in sent["tools"]] == ["get_weather"]


def test_a_tool_type_nobody_runs_is_refused(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.responses.create(model="echo", input="hi", tools=[{"type": "teleport"}])
    assert raised.value.body["param"] == "tools[0].type"


def test_echo_forced_tool_by_name(client):
    response = client.responses.create(
        model="echo",
        input="Lyon",
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "name": "get_weather"},
    )
    call = response.output[0]
    # Echo's arguments are an instance of the tool's parameters (adapters/schema_instance.py).
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Lyon"}


class City(BaseModel):
    name: str
    population: int


def test_parse_structured_output(client, served):
    parsed = client.responses.parse(
        model="gpt-mock", input='{"name": "Lyon", "population": 522000}', text_format=City
    )
    assert parsed.output_parsed == City(name="Lyon", population=522000)
    response_format = served.sent()["response_format"]
    assert response_format["type"] == "json_schema"
    assert response_format["json_schema"]["name"] == "City"
    assert response_format["json_schema"]["schema"]["required"] == ["name", "population"]


def test_length_is_incomplete(client):
    response = client.responses.create(model="echo", input="one two three", max_output_tokens=2)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "echo: one"
    with client.responses.stream(model="echo", input="one two three", max_output_tokens=2) as s:
        events = list(s)
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


def _usage_by_model(node: RunningNode) -> dict[str, dict]:
    with node.client() as admin:
        report = admin.get("/admin/usage", params={"by": "model"})
    assert report.status_code == 200, report.text
    return {row["group"]: row for row in report.json()["data"]}


def test_usage_is_charged_like_chat(client, served):
    before = _usage_by_model(served.node).get("gpt-mock", {})
    raw = client.responses.with_raw_response.create(model="gpt-mock", input="count me")
    response = raw.parse()
    cost = int(raw.headers["aihub-cost-micros"])
    assert response.id == "resp_" + raw.headers["aihub-request-id"].removeprefix("req_")
    with client.responses.stream(model="gpt-mock", input="and me") as stream:
        streamed = stream.get_final_response()
    after = _usage_by_model(served.node)["gpt-mock"]
    usages = (response.usage, streamed.usage)
    assert after["requests"] - before.get("requests", 0) == 2
    assert after["tokens_in"] - before.get("tokens_in", 0) == sum(u.input_tokens for u in usages)
    assert after["tokens_out"] - before.get("tokens_out", 0) == sum(u.output_tokens for u in usages)
    # A micro-unit per token in, two per token out (the deployment's prices per 1M).
    costs = [u.input_tokens + 2 * u.output_tokens for u in usages]
    assert cost == costs[0]
    assert after["cost_micros"] - before.get("cost_micros", 0) == sum(costs)


def test_errors_are_the_sdks_exceptions(client, served):
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model="nope", input="x")
    assert missing.value.code == "model_not_found"
    bad_key = openai.OpenAI(base_url=served.node.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.responses.create(model="echo", input="x")
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.create(model="echo", input="x", temperature=5)
    assert bad.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as unknown:
        client.responses.create(model="echo", input=[{"type": "reasoning", "summary": []}])
    assert unknown.value.param == "input[0]"
    with pytest.raises(openai.NotFoundError) as gone:
        client.responses.create(model="echo", input="x", previous_response_id="resp_1")
    assert gone.value.param == "previous_response_id"


def test_upstream_failures(client, served):
    refusal = openai_error(400, "The upstream refuses this", "invalid_request_error")
    served.mock.script.fail_next(refusal)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="gpt-mock", input="x")
    assert "The upstream refuses this" in refused.value.message
    # Cut mid-stream: too late for an error status, so the stream ends `response.failed`.
    served.mock.script.cut_stream_after = 2
    try:
        with client.responses.stream(model="gpt-mock", input="one two three") as stream:
            events = list(stream)
    finally:
        served.mock.script.cut_stream_after = None
    failed = events[-1]
    assert failed.type == "response.failed" and failed.response.status == "failed"
    assert failed.response.error.message
    assert "response.output_text.delta" in [event.type for event in events]


def test_wire_shapes_validate_strictly(served):
    """The SDK builds its models leniently; OpenAI's own types, validated strictly, check that
    every field it declares required is there."""
    headers = {"authorization": f"Bearer {served.node.key}"}
    body = {"model": "echo", "input": "hi", "tools": [WEATHER_TOOL], "tool_choice": "required"}
    for streamed in (False, True):
        reply = httpx.post(
            served.node.url + "/v1/responses", json={**body, "stream": streamed}, headers=headers
        )
        assert reply.status_code == 200
        if not streamed:
            Response.model_validate(reply.json())
            continue
        frames = [frame for frame in reply.text.split("\n\n") if frame]
        for frame in frames:
            _STREAM_EVENT.validate_json(frame.split("\n")[1].removeprefix("data: "))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"", None),
        (b"{not json", None),
        (b'{"model": "echo"}', None),
        (b'{"model": "echo", "input": []}', "input"),
        (b'{"model": "echo", "input": [1]}', "input[0]"),
        (b'{"model": "echo", "input": [{"type": "message"}]}', "input[0]"),
        (b'{"model": "echo", "input": [{"role": "robot", "content": "x"}]}', "input[0].role"),
        (
            b'{"model": "echo", "input": [{"role": "user", "content": [{"type": "input_image"}]}]}',
            "input",
        ),
        (b'{"model": "echo", "input": [{"type": "function_call", "name": "f"}]}', "input[0]"),
        (b'{"model": "echo", "input": "x", "tools": [{"type": "file_search"}]}', "tools[0].type"),
        (b'{"model": "echo", "input": "x", "text": {"format": {"type": "json_schema"}}}', None),
        (b'{"model": "echo", "input": "x", "max_output_tokens": 0}', "max_output_tokens"),
    ],
)
def test_bad_bodies_are_400s(served, body, param):
    headers = {"authorization": f"Bearer {served.node.key}", "content-type": "application/json"}
    reply = httpx.post(served.node.url + "/v1/responses", content=body, headers=headers)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param


def test_kept_responses_are_read_listed_and_deleted_by_their_key(client, served):
    created = client.responses.create(
        model="echo", input=[{"role": "user", "content": "keep me"}], metadata={"n": "1"}
    )
    assert created.store is True
    kept = client.responses.retrieve(created.id)
    assert kept.id == created.id and kept.output_text == "echo: keep me"
    assert kept.metadata == {"n": "1"} and kept.usage.output_tokens == 3
    items = client.responses.input_items.list(created.id)
    assert [(item.type, item.role) for item in items.data] == [("message", "user")]
    assert items.data[0].id and items.first_id == items.last_id == items.data[0].id

    other = openai.OpenAI(base_url=served.node.url + "/v1", api_key=served.other_key, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model="echo", input="x", previous_response_id=created.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(created.id)

    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(created.id)


def test_store_false_keeps_nothing(client):
    response = client.responses.create(model="echo", input="forget me", store=False)
    assert response.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_previous_response_id_continues_a_tool_round_trip(client, served):
    first = client.responses.create(
        model="gpt-mock", input="weather in Paris?", tools=[WEATHER_TOOL]
    )
    call = first.output[0]
    assert call.type == "function_call"
    answer = client.responses.create(
        model="gpt-mock",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "21C"}],
        tools=[WEATHER_TOOL],
        tool_choice="none",
    )
    assert answer.previous_response_id == first.id
    assert answer.output_text == "mock says: weather in Paris?"
    assert served.sent()["messages"] == [
        {"role": "user", "content": "weather in Paris?"},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "type": "function",
                    "id": "call_mock1",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "content": "21C", "tool_call_id": "call_mock1"},
    ]
    # A third turn sees the whole chain: both earlier turns' inputs and outputs.
    client.responses.create(model="gpt-mock", previous_response_id=answer.id, input="thanks")
    messages = served.sent()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant", "user"]
    assert messages[3]["content"] == "mock says: weather in Paris?"


def test_a_streamed_response_is_kept_before_its_stream_ends(client):
    with client.responses.stream(model="echo", input="streamed and kept") as stream:
        final = stream.get_final_response()
    kept = client.responses.retrieve(final.id)
    assert kept.status == "completed" and kept.output_text == "echo: streamed and kept"
    follow = client.responses.create(model="echo", previous_response_id=final.id, input="next")
    assert follow.output_text == "echo: next"
    assert follow.usage.input_tokens > final.usage.input_tokens


# --- through a peer ----------------------------------------------------------------------------


def test_responses_through_a_peer_keep_their_receipts_and_the_cap(tmp_path: Path) -> None:
    """Bob's Responses client uses a model only alice serves: bob calls alice through chat
    completions (peers speak that) and renders her answer as a Response, plain and streamed.
    Both nodes record each call, bob keeps alice's receipt for each, and the cap alice gave
    bob ($0.0002 at $1 per 1M tokens each way) runs out and holds."""
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    with alice.run(), bob.run() as b:
        token = invite(alice, "--models", "llama3", "--cap", "0.0002")
        cli("join", token, "--data-dir", str(bob.path))
        assert wait_for(lambda: model_owners(b).get("llama3") == "alice")
        with openai.OpenAI(base_url=b.url + "/v1", api_key=b.key, max_retries=0) as client:
            # A cap admits only what it could pay at worst: the output cap is part of that.
            ask = {"model": "llama3", "input": "Hello, hub", "max_output_tokens": 16}
            plain = client.responses.create(**ask)
            with client.responses.stream(**ask) as stream:
                streamed = stream.get_final_response()
            assert plain.output_text == streamed.output_text == "echo: Hello, hub"
            assert plain.status == streamed.status == "completed"
            assert plain.usage.output_tokens == streamed.usage.output_tokens == 3
            assert wait_for(lambda: _served(alice.path) == 2 and _consumed(bob.path) == 2)
            assert wait_for(lambda: _receipts(bob.path) == 2)
            refused = None
            for _ in range(25):
                try:
                    client.responses.create(model="llama3", input="Hello, hub", max_output_tokens=5)
                except openai.RateLimitError as error:
                    refused = error
                    break
            assert refused is not None
            with pytest.raises(openai.RateLimitError):
                client.responses.create(model="llama3", input="Hello, hub", max_output_tokens=5)
    spent = [r.cost_micros for r in usage_rows(alice.path) if r.status == 200]
    assert 0 < sum(spent) <= 200
    assert _receipts(bob.path) == len(spent)


def _served(path: Path) -> int:
    return len([r for r in usage_rows(path) if r.status == 200])


def _consumed(path: Path) -> int:
    return len([r for r in usage_rows(path) if r.deployment == "llama3@alice"])


def _receipts(path: Path) -> int:
    with sqlite3.connect(path / DATABASE_FILE) as db:
        return db.execute("SELECT count(*) FROM receipts").fetchone()[0]
