"""The Bedrock adapter against a mock that speaks the Converse API's wire format (JSON answers,
the binary event stream, AWS's error bodies) and verifies every SigV4 signature; and Bedrock
deployments served by real nodes, to the official `openai` and `anthropic` SDKs and to a peer.
Credentials are fake and every request stays on loopback."""

from __future__ import annotations

import asyncio
import base64
import itertools
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import msgspec
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters import bedrock_auth
from adapters import bedrock_wire as wire
from adapters.bedrock import BedrockAdapter, BedrockStream, chat_result, converse_body
from adapters.http import UpstreamClient
from adapters.types import Upstream, UpstreamError
from node.config import CONFIG_TEMPLATE, ConfigError, parse_config, render_template
from tests.calls import chat_call, chunks, collect, embed_call, last_sent
from tests.conftest import NodeDir, run_node
from tests.mocks import bedrock_mock as mocked
from tests.mocks.bedrock_mock import (
    ACCESS_DENIED,
    ACCESS_KEY,
    API_KEY,
    INTERNAL,
    MODEL_ERROR,
    MODEL_NOT_READY,
    MODEL_TIMEOUT,
    NOT_FOUND,
    QUOTA,
    REGION,
    SECRET_KEY,
    THROTTLING,
    TOO_LONG,
    UNAVAILABLE,
    VALIDATION,
    BedrockMock,
    event_frame,
    frame,
)
from tests.mocks.script import Failure
from tests.mocks.server import serve_app
from tests.test_federation import cli, invite, make_peer, model_owners, usage_rows, wait_for

MODEL = "anthropic.claude-mock-v1:0"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CLOCK_TOOL = {"type": "function", "function": {"name": "get_time"}}
PNG = "data:image/png;base64,iVBORw0KGgo="
_AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_BEARER_TOKEN_BEDROCK",
)


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The fake credentials in the environment, and nothing of the machine's own AWS setup:
    no shared files, no metadata service (the chain must never leave loopback)."""
    for name in _AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)


@pytest.fixture(scope="module")
def mock() -> BedrockMock:
    return BedrockMock(models=(MODEL, "amazon.nova-mock-v1:0"))


@pytest.fixture(scope="module")
def base_url(mock: BedrockMock) -> Iterator[str]:
    with serve_app(mock) as url:
        yield url


@pytest.fixture(autouse=True)
def fresh_mock(mock: BedrockMock) -> None:
    mock.reset()


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    async with UpstreamClient() as client:
        yield client


def bedrock(base_url: str, client: UpstreamClient, **fields: Any) -> BedrockAdapter:
    fields.setdefault("region", REGION)
    fields.setdefault("model", MODEL)
    return BedrockAdapter(Upstream(provider="bedrock", base_url=base_url, **fields), client)


def streamed_text(parsed: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in parsed if c["choices"])


def tool_arguments(parsed: list[dict[str, Any]]) -> dict[int, dict[str, str]]:
    """Each streamed tool call, its fragments joined."""
    calls: dict[int, dict[str, str]] = {}
    for chunk in parsed:
        if not chunk["choices"]:
            continue
        for piece in chunk["choices"][0]["delta"].get("tool_calls") or ():
            call = calls.setdefault(piece["index"], {"id": "", "name": "", "arguments": ""})
            call["id"] += piece.get("id") or ""
            call["name"] += piece["function"].get("name") or ""
            call["arguments"] += piece["function"].get("arguments") or ""
    return calls


# --- request translation ----------------------------------------------------------------------


async def test_request_is_translated_to_converse(base_url, client, mock):
    call = chat_call(
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "developer", "content": [{"type": "text", "text": "answer in French"}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": PNG}},
                    {"type": "image_url", "image_url": {"url": "data:image/gif,GIF89a"}},
                ],
            },
        ],
        max_tokens=50,
        temperature=1.5,
        top_p=0.9,
        stop="END",
        # Fields Converse has no place for are dropped, not sent to be refused.
        seed=7,
        presence_penalty=0.5,
        user="user-42",
        response_format={"type": "json_object"},
    )
    result = await bedrock(base_url, client).chat(call)
    assert result.chat_completion().choices[0].message.content == "mock says: what is this?"
    received = mock.script.received[-1]
    # The model id is percent-encoded in the path, exactly as it was signed.
    assert received.path == "/model/anthropic.claude-mock-v1%3A0/converse"
    assert received.headers["authorization"].startswith(
        f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/"
    )
    assert f"/{REGION}/bedrock/aws4_request" in received.headers["authorization"]
    assert last_sent(mock) == {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"text": "what is this?"},
                    {"image": {"format": "png", "source": {"bytes": "iVBORw0KGgo="}}},
                    {
                        "image": {
                            "format": "gif",
                            "source": {"bytes": base64.b64encode(b"GIF89a").decode()},
                        }
                    },
                ],
            }
        ],
        # Above Bedrock's range of 1: the most random there is.
        "inferenceConfig": {
            "maxTokens": 50,
            "temperature": 1.0,
            "topP": 0.9,
            "stopSequences": ["END"],
        },
        "system": [{"text": "be brief"}, {"text": "answer in French"}],
    }


async def test_max_tokens_is_always_sent_and_capped_by_the_deployment(base_url, client, mock):
    adapter = bedrock(base_url, client, max_output_tokens=100)
    await adapter.chat(chat_call())
    assert last_sent(mock)["inferenceConfig"] == {"maxTokens": 100}
    await adapter.chat(chat_call(max_completion_tokens=5000))
    assert last_sent(mock)["inferenceConfig"] == {"maxTokens": 100}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, None),
        ({"tool_choice": "auto"}, {"auto": {}}),
        ({"tool_choice": "required"}, {"any": {}}),
        (
            {"tool_choice": {"type": "function", "function": {"name": "get_time"}}},
            {"tool": {"name": "get_time"}},
        ),
    ],
)
async def test_tools_and_tool_choice(base_url, client, mock, fields, expected):
    await bedrock(base_url, client).chat(chat_call(tools=[WEATHER_TOOL, CLOCK_TOOL], **fields))
    config = last_sent(mock)["toolConfig"]
    assert config["tools"] == [
        {
            "toolSpec": {
                "name": "get_weather",
                "inputSchema": {"json": WEATHER_TOOL["function"]["parameters"]},
                "description": "The weather in a city",
            }
        },
        # Converse requires a schema: a tool without parameters takes an empty object.
        {
            "toolSpec": {
                "name": "get_time",
                "inputSchema": {"json": {"type": "object", "properties": {}}},
            }
        },
    ]
    assert config.get("toolChoice") == expected


async def test_tool_choice_none_leaves_tools_out_unless_the_turns_used_them(base_url, client, mock):
    adapter = bedrock(base_url, client)
    answer = await adapter.chat(chat_call(tools=[WEATHER_TOOL], tool_choice="none"))
    assert "toolConfig" not in last_sent(mock)
    assert answer.chat_completion().choices[0].finish_reason == "stop"
    history = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "t1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
    ]
    await adapter.chat(chat_call(messages=history, tools=[WEATHER_TOOL], tool_choice="none"))
    # Bedrock refuses tool blocks without a toolConfig: the tools stay, with no choice.
    assert "toolChoice" not in last_sent(mock)["toolConfig"]


async def test_tool_round_trip_merges_results_into_one_user_turn(base_url, client, mock):
    messages = [
        {"role": "user", "content": "weather and time in Paris?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "t1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {"id": "t2", "type": "function", "function": {"name": "get_time", "arguments": ""}},
            ],
        },
        {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "t2", "content": [{"type": "text", "text": "noon"}]},
        {"role": "user", "content": "thanks"},
    ]
    result = await bedrock(base_url, client).chat(
        chat_call(messages=messages, tools=[WEATHER_TOOL, CLOCK_TOOL])
    )
    sent = last_sent(mock)["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[1]["content"] == [
        {"text": "Checking."},
        {"toolUse": {"toolUseId": "t1", "name": "get_weather", "input": {"city": "Paris"}}},
        {"toolUse": {"toolUseId": "t2", "name": "get_time", "input": {}}},
    ]
    assert sent[2]["content"] == [
        {"toolResult": {"toolUseId": "t1", "content": [{"text": "sunny"}]}},
        {"toolResult": {"toolUseId": "t2", "content": [{"text": "noon"}]}},
        {"text": "thanks"},
    ]
    assert result.chat_completion().choices[0].message.content == "mock says: sunny noon thanks"


@pytest.mark.parametrize(
    ("message", "words"),
    [
        (
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}],
            },
            "data: URL",
        ),
        (
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/tiff;base64,AA=="}}
                ],
            },
            "image/tiff",
        ),
        (
            {
                "role": "user",
                "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}],
            },
            "input_audio",
        ),
        (
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "t", "type": "function", "function": {"name": "f", "arguments": "[1"}}
                ],
            },
            "JSON object",
        ),
        (
            {
                "role": "assistant",
                "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
            "needs an id",
        ),
        ({"role": "tool", "content": "x"}, "tool_call_id"),
        (
            {"role": "system", "content": [{"type": "image_url", "image_url": {"url": PNG}}]},
            "text only",
        ),
    ],
)
async def test_what_converse_cannot_take_is_refused_before_sending(
    base_url, client, mock, message, words
):
    with pytest.raises(UpstreamError) as refused:
        await bedrock(base_url, client).chat(chat_call(messages=[message]))
    assert refused.value.status == 400 and words in refused.value.message
    assert mock.script.received == []


# --- translation both ways, over message shapes (hypothesis) ----------------------------------

_words = st.text(st.sampled_from("abcdé xyz"), min_size=1, max_size=12).filter(str.strip)
_ids = st.text(st.sampled_from("abc123_-"), min_size=1, max_size=8)
_arguments = st.dictionaries(
    st.sampled_from(["city", "n", "on"]), st.integers(0, 9) | _words, max_size=3
)


@st.composite
def _conversation(draw: st.DrawFn) -> list[dict[str, Any]]:
    """An OpenAI conversation: system prompts anywhere, user turns of text and images,
    assistant turns with text and tool calls, each call answered by a tool message."""
    messages: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(1, 5))):
        if draw(st.booleans()):
            messages.append(
                {"role": draw(st.sampled_from(["system", "developer"])), "content": draw(_words)}
            )
        parts: list[dict[str, Any]] = [{"type": "text", "text": draw(_words)}]
        if draw(st.booleans()):
            parts.append({"type": "image_url", "image_url": {"url": PNG}})
        messages.append({"role": "user", "content": parts if draw(st.booleans()) else draw(_words)})
        if draw(st.booleans()):
            ids = draw(st.lists(_ids, min_size=1, max_size=3, unique=True))
            calls = [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": msgspec.json.encode(draw(_arguments)).decode(),
                    },
                }
                for call_id in ids
            ]
            text = draw(st.none() | _words)
            messages.append({"role": "assistant", "content": text, "tool_calls": calls})
            messages += [{"role": "tool", "tool_call_id": i, "content": draw(_words)} for i in ids]
        elif draw(st.booleans()):
            messages.append({"role": "assistant", "content": draw(_words)})
    return messages


def _texts(messages: list[dict[str, Any]], roles: tuple[str, ...]) -> list[str]:
    texts: list[str] = []
    for message in messages:
        if message["role"] not in roles:
            continue
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [part["text"] for part in content if part["type"] == "text"]
    return texts


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_conversation())
def test_every_conversation_becomes_a_converse_request_bedrock_takes(messages):
    call = chat_call(messages=messages, tools=[WEATHER_TOOL])
    body = converse_body(call, Upstream(provider="bedrock", model=MODEL))
    # The mock's request type is as strict as Converse: this must decode and hold.
    request = msgspec.json.decode(body, type=mocked._Request)
    assert mocked._conversation_problem(request) is None
    sent = msgspec.json.decode(body)
    assert [block["text"] for block in sent.get("system", [])] == _texts(
        messages, ("system", "developer")
    )
    said = [b["text"] for m in sent["messages"] for b in m["content"] if "text" in b]
    assert said == _texts(messages, ("user", "assistant"))
    uses = [b["toolUse"] for m in sent["messages"] for b in m["content"] if "toolUse" in b]
    calls = [c for m in messages for c in m.get("tool_calls") or ()]
    assert [(u["toolUseId"], u["input"]) for u in uses] == [
        (c["id"], msgspec.json.decode(c["function"]["arguments"])) for c in calls
    ]
    results = [b["toolResult"] for m in sent["messages"] for b in m["content"] if "toolResult" in b]
    tools = [m for m in messages if m["role"] == "tool"]
    assert [(r["toolUseId"], r["content"][0]["text"]) for r in results] == [
        (m["tool_call_id"], m["content"]) for m in tools
    ]


_stop_reasons = st.sampled_from(
    [
        "end_turn",
        "stop_sequence",
        "max_tokens",
        "tool_use",
        "guardrail_intervened",
        "content_filtered",
        "model_context_window_exceeded",
    ]
)
_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}


@st.composite
def _answer(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "texts": draw(st.lists(_words, max_size=4)),
        "calls": [
            (f"tooluse_{i}", draw(st.sampled_from(["get_weather", "get_time"])), draw(_arguments))
            for i in range(draw(st.integers(0, 3)))
        ],
        "stop": draw(_stop_reasons),
        "usage": (
            draw(st.integers(0, 10**6)),
            draw(st.integers(0, 10**6)),
            draw(st.integers(0, 1000)),
        ),
    }


def _expected_finish(answer: dict[str, Any]) -> str:
    reason = _FINISH[answer["stop"]]
    return "tool_calls" if answer["calls"] and reason == "stop" else reason


@settings(max_examples=60, deadline=None)
@given(_answer())
def test_every_converse_answer_becomes_an_openai_answer(answer):
    content = [{"text": text} for text in answer["texts"]]
    content += [{"toolUse": {"toolUseId": i, "name": n, "input": a}} for i, n, a in answer["calls"]]
    prompt, output, cached = answer["usage"]
    body = {
        "output": {"message": {"role": "assistant", "content": content}},
        "stopReason": answer["stop"],
        "usage": {
            "inputTokens": prompt,
            "outputTokens": output,
            "cacheReadInputTokens": cached,
            "totalTokens": 1,
        },
        "metrics": {"latencyMs": 1},
    }
    decoded = wire.response_decoder.decode(msgspec.json.encode(body))
    result = chat_result(decoded, chat_call(), Upstream(provider="bedrock", model=MODEL))
    choice = result.chat_completion().choices[0]
    assert choice.message.content == ("".join(answer["texts"]) or (None if answer["calls"] else ""))
    assert [
        (c.id, c.function.name, msgspec.json.decode(c.function.arguments or ""))
        for c in choice.message.tool_calls or ()
    ] == answer["calls"]
    assert choice.finish_reason == _expected_finish(answer)
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (prompt + cached, output)
    assert not result.usage_estimated


class _Chunked:
    """An upstream response whose body arrives in the given pieces."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces
        self.closed = False

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece

    async def aclose(self) -> None:
        self.closed = True


def _frames_of(answer: dict[str, Any], fragments: int) -> bytes:
    frames = [event_frame("messageStart", {"role": "assistant"})]
    for text in answer["texts"]:
        frames.append(
            event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": text}})
        )
    for block, (call_id, name, arguments) in enumerate(answer["calls"], start=1):
        start = {"toolUse": {"toolUseId": call_id, "name": name}}
        frames.append(
            event_frame("contentBlockStart", {"contentBlockIndex": block, "start": start})
        )
        text = msgspec.json.encode(arguments).decode()
        step = max(1, len(text) // fragments)
        for cut in range(0, len(text), step):
            delta = {"toolUse": {"input": text[cut : cut + step]}}
            frames.append(
                event_frame("contentBlockDelta", {"contentBlockIndex": block, "delta": delta})
            )
        frames.append(event_frame("contentBlockStop", {"contentBlockIndex": block}))
    frames.append(event_frame("messageStop", {"stopReason": answer["stop"]}))
    prompt, output, cached = answer["usage"]
    usage = {
        "inputTokens": prompt,
        "outputTokens": output,
        "cacheWriteInputTokens": cached,
        "totalTokens": 0,
    }
    frames.append(event_frame("metadata", {"usage": usage, "metrics": {"latencyMs": 3}}))
    return b"".join(frames)


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=60, deadline=None)
@given(_answer(), st.integers(1, 5), st.lists(st.integers(0, 10**6), max_size=12))
def test_every_event_stream_becomes_neutral_events_however_it_is_cut(answer, fragments, cuts):
    """Frames split anywhere across reads (inside a prelude, a header, a CRC), tool input in
    any number of fragments: the same text, calls, finish and usage arrive."""
    data = _frames_of(answer, fragments)
    call = chat_call(stream=True, stream_options={"include_usage": True})
    stream = BedrockStream(
        call, Upstream(provider="bedrock", model=MODEL), _Chunked(_pieces(data, cuts))
    )  # type: ignore[arg-type]
    events, error = asyncio.run(collect(stream))
    assert error is None
    parsed = chunks(events)
    assert streamed_text(parsed) == "".join(answer["texts"])
    calls = tool_arguments(parsed)
    assert [
        (c["id"], c["name"], msgspec.json.decode(c["arguments"])) for c in calls.values()
    ] == answer["calls"]
    assert parsed[-2]["choices"][0]["finish_reason"] == _expected_finish(answer)
    prompt, output, cached = answer["usage"]
    # OpenAI's usage leaves out counts of 0.
    assert parsed[-1]["usage"].get("prompt_tokens", 0) == prompt + cached
    assert parsed[-1]["usage"].get("completion_tokens", 0) == output


# --- answers ----------------------------------------------------------------------------------


async def test_plain_answer_and_its_usage(base_url, client, mock):
    mock.cache_read, mock.cache_write = 100, 20
    result = await bedrock(base_url, client).chat(chat_call())
    completion = result.chat_completion()
    assert completion.choices[0].message.content == "mock says: hi there"
    assert completion.choices[0].finish_reason == "stop"
    # Cached prompt tokens are input too: 5 + 100 + 20.
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (125, 4)
    assert not result.usage_estimated


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("guardrail_intervened", "content_filter"),
        ("content_filtered", "content_filter"),
        ("model_context_window_exceeded", "length"),
    ],
)
async def test_stop_reasons_become_finish_reasons(base_url, client, mock, stop_reason, finish):
    mock.stop_reason = stop_reason
    result = await bedrock(base_url, client).chat(chat_call())
    assert result.chat_completion().choices[0].finish_reason == finish


async def test_max_tokens_and_stop_sequence(base_url, client):
    adapter = bedrock(base_url, client)
    cut = await adapter.chat(chat_call(max_tokens=2))
    assert cut.chat_completion().choices[0].finish_reason == "length"
    assert cut.chat_completion().choices[0].message.content == "mock says:"
    stopped = await adapter.chat(chat_call(stop=["there"]))
    assert stopped.chat_completion().choices[0].finish_reason == "stop"


async def test_tool_call_answer(base_url, client):
    result = await bedrock(base_url, client).chat(
        chat_call(tools=[WEATHER_TOOL], tool_choice="required")
    )
    choice = result.chat_completion().choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.id == "tooluse_mock00010" and call.function.name == "get_weather"
    assert msgspec.json.decode(call.function.arguments or "") == {"city": "Paris"}


# --- streams ----------------------------------------------------------------------------------


async def test_stream_of_text(base_url, client, mock):
    stream = await bedrock(base_url, client).open_stream(chat_call(stream=True))
    events, error = await collect(stream)
    assert error is None
    assert mock.script.received[-1].path.endswith("/converse-stream")
    assert mock.script.received[-1].headers["accept"] == "application/vnd.amazon.eventstream"
    parsed = chunks(events)
    assert parsed[0]["choices"][0]["delta"]["role"] == "assistant"
    assert streamed_text(parsed) == "mock says: hi there"
    assert parsed[-1]["choices"][0]["finish_reason"] == "stop"
    # No usage chunk unless asked; the totals are on the stream either way.
    assert all("usage" not in chunk for chunk in parsed)
    assert (stream.usage.prompt_tokens, stream.usage.completion_tokens) == (5, 4)
    assert not stream.usage_estimated


async def test_stream_of_tool_calls_split_across_events(base_url, client):
    call = chat_call(
        stream=True, tools=[WEATHER_TOOL, CLOCK_TOOL], stream_options={"include_usage": True}
    )
    stream = await bedrock(base_url, client).open_stream(call)
    events, error = await collect(stream)
    assert error is None
    parsed = chunks(events)
    assert streamed_text(parsed) == "Let me check."
    calls = tool_arguments(parsed)
    assert calls == {
        0: {"id": "tooluse_mock00010", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        # A call without input gets `{}`, as OpenAI's clients expect.
        1: {"id": "tooluse_mock00011", "name": "get_time", "arguments": "{}"},
    }
    assert parsed[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert parsed[-1]["usage"]["completion_tokens"] == 23


@pytest.mark.parametrize(
    ("name", "status", "retryable"),
    [
        ("modelStreamErrorException", 502, True),
        ("throttlingException", 429, True),
        ("internalServerException", 502, True),
        ("serviceUnavailableException", 502, True),
        ("validationException", 400, False),
    ],
)
async def test_exception_frame_mid_stream(base_url, client, mock, name, status, retryable):
    mock.fail_stream_next(name, "The model stream failed.", after=3)
    stream = await bedrock(base_url, client).open_stream(chat_call(stream=True))
    events, error = await collect(stream)
    assert error is not None and (error.status, error.retryable) == (status, retryable)
    # AWS's exception, named as its HTTP answer names it.
    assert f"({name[0].upper()}{name[1:]})" in error.message
    assert "The model stream failed." in error.message
    assert streamed_text(chunks(events)) == "mock says:"
    # What did arrive is counted, estimated.
    assert stream.usage is not None and stream.usage.completion_tokens >= 1
    assert stream.usage_estimated


async def test_exception_before_any_content_yields_no_event(base_url, client, mock):
    mock.fail_stream_next("throttlingException", "Too many tokens", after=1)
    stream = await bedrock(base_url, client).open_stream(chat_call(stream=True))
    events, error = await collect(stream)
    # Nothing was yielded: the router can still retry or fall back.
    assert events == [] and error is not None and error.status == 429


# Eight frames: messageStart, four deltas, contentBlockStop, messageStop, metadata.
@pytest.mark.parametrize("cut", [1, 3, 6])
async def test_stream_cut_short_is_an_error(base_url, client, mock, cut):
    mock.script.cut_stream_after = cut
    stream = await bedrock(base_url, client).open_stream(chat_call(stream=True))
    _, error = await collect(stream)
    assert error is not None and error.status == 502 and error.retryable
    assert "ended early" in error.message
    assert stream.usage is not None and stream.usage_estimated


async def test_stream_without_metadata_is_whole_with_estimated_usage(client):
    data = event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "hi"}})
    data += event_frame("messageStop", {"stopReason": "end_turn"})
    stream = BedrockStream(
        chat_call(stream=True), Upstream(provider="bedrock", model=MODEL), _Chunked([data])
    )  # type: ignore[arg-type]
    events, error = await collect(stream)
    assert error is None and streamed_text(chunks(events)) == "hi"
    assert stream.usage_estimated


@pytest.mark.parametrize(
    ("data", "words"),
    [
        # A frame whose message CRC is wrong.
        (
            event_frame("messageStart", {"role": "assistant"})[:-1] + b"\x00",
            "broken event-stream frame",
        ),
        # A prelude whose CRC is wrong.
        (
            b"\x00\x00\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00" + b"\x00" * 20,
            "broken event-stream frame",
        ),
        # The body ends inside a frame.
        (event_frame("messageStart", {"role": "assistant"})[:20], "inside a frame"),
        # A payload that is not JSON.
        (
            frame({":event-type": "contentBlockDelta", ":message-type": "event"}, b"{not json"),
            "invalid JSON",
        ),
    ],
)
async def test_hostile_frames_are_clear_errors(data, words):
    stream = BedrockStream(
        chat_call(stream=True), Upstream(provider="bedrock", model=MODEL), _Chunked([data])
    )  # type: ignore[arg-type]
    _, error = await collect(stream)
    assert error is not None and error.status == 502 and words in error.message


async def test_an_oversized_frame_is_refused_before_it_is_whole():
    huge = event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "x" * 5000}})
    upstream = Upstream(provider="bedrock", model=MODEL, max_event_bytes=1024)
    # Sent in small pieces: refused once more than the limit is pending, not at the end.
    pieces = [huge[i : i + 256] for i in range(0, len(huge), 256)]
    stream = BedrockStream(chat_call(stream=True), upstream, _Chunked(pieces))  # type: ignore[arg-type]
    _, error = await collect(stream)
    assert error is not None and error.code == "upstream_response_too_large"


async def test_aclose_hangs_up_on_bedrock(base_url, client, mock):
    mock.script.chunk_delay = 0.2
    stream = await bedrock(base_url, client).open_stream(chat_call(stream=True))
    events = aiter(stream)
    await anext(events)
    await stream.aclose()
    # The socket closes on the loop's next turns: wait for the mock to notice, on the loop.
    for _ in range(250):
        if mock.script.cancelled:
            break
        await asyncio.sleep(0.02)
    assert mock.script.cancelled == 1


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "status", "retryable", "code"),
    [
        (THROTTLING, 429, True, "rate_limit_exceeded"),
        (MODEL_NOT_READY, 429, True, "rate_limit_exceeded"),
        (VALIDATION, 400, False, "ValidationException"),
        (TOO_LONG, 400, False, "context_length_exceeded"),
        # Not retried, but fallen back from: another account's quota may be left.
        (QUOTA, 429, False, "insufficient_quota"),
        (ACCESS_DENIED, 502, False, "AccessDeniedException"),
        (NOT_FOUND, 404, False, "model_not_found"),
        (MODEL_TIMEOUT, 504, True, "ModelTimeoutException"),
        (MODEL_ERROR, 502, True, "ModelErrorException"),
        (INTERNAL, 502, True, "InternalServerException"),
        (UNAVAILABLE, 502, True, "ServiceUnavailableException"),
    ],
)
async def test_error_answers(base_url, client, mock, failure, status, retryable, code):
    mock.script.fail_next(failure)
    with pytest.raises(UpstreamError) as failed:
        await bedrock(base_url, client).chat(chat_call())
    error = failed.value
    assert (error.status, error.retryable, error.code) == (status, retryable, code)
    assert error.upstream_status == failure.status
    assert msgspec.json.decode(failure.body)["message"] in error.message


@pytest.mark.parametrize(
    "header", ["x" * 100, "Throttling Exception<script>", "", ":http://internal", "Ü"]
)
async def test_a_hostile_error_type_header_is_ignored_for_the_status(
    base_url, client, mock, header
):
    mock.script.fail_next(Failure(429, b'{"message": "slow"}', {"x-amzn-ErrorType": header}))
    with pytest.raises(UpstreamError) as failed:
        await bedrock(base_url, client).chat(chat_call())
    assert (failed.value.status, failed.value.retryable, failed.value.code) == (429, True, None)


async def test_errors_opening_a_stream_are_the_same(base_url, client, mock):
    mock.script.fail_next(THROTTLING)
    with pytest.raises(UpstreamError) as failed:
        await bedrock(base_url, client).open_stream(chat_call(stream=True))
    assert failed.value.status == 429 and failed.value.retryable


async def test_a_retry_after_is_honoured(base_url, client, mock):
    mock.script.fail_next(
        mocked.aws_error(429, "ThrottlingException", "slow down", {"retry-after": "3"})
    )
    with pytest.raises(UpstreamError) as failed:
        await bedrock(base_url, client).chat(chat_call())
    assert failed.value.retry_after == 3


async def test_real_refusals_of_the_mock(base_url, client, mock):
    with pytest.raises(UpstreamError) as unknown:
        await bedrock(base_url, client, model="anthropic.nope-v1:0").chat(chat_call())
    assert unknown.value.status == 404 and unknown.value.code == "model_not_found"
    with pytest.raises(UpstreamError) as assistant_first:
        await bedrock(base_url, client).chat(
            chat_call(messages=[{"role": "assistant", "content": "hi"}])
        )
    assert assistant_first.value.status == 400
    assert "must start with a user message" in assistant_first.value.message


async def test_an_error_body_that_is_not_aws(base_url, client, mock):
    mock.script.fail_next(Failure(502, b"<html>Bad Gateway</html>"))
    with pytest.raises(UpstreamError) as failed:
        await bedrock(base_url, client).chat(chat_call())
    assert failed.value.status == 502 and "Bad Gateway" in failed.value.message


async def test_an_answer_that_is_not_json_is_a_502(client):
    async def garbage(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"[" * 100_000})

    with serve_app(garbage) as url, pytest.raises(UpstreamError) as failed:
        await bedrock(url, client).chat(chat_call())
    assert failed.value.status == 502


async def test_embeddings_are_refused_without_a_call(base_url, client, mock):
    with pytest.raises(UpstreamError) as refused:
        await bedrock(base_url, client).embed(embed_call(input="hi"))
    assert refused.value.status == 400 and refused.value.code == "model_not_supported"
    assert mock.script.received == []


# --- credentials and signatures ---------------------------------------------------------------


async def test_a_wrong_secret_gets_aws_invalid_signature(base_url, client, mock, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(UpstreamError) as failed:
        await bedrock(base_url, client).chat(chat_call())
    # The node's own credentials are wrong: a 502, never retried, the client's fault never.
    assert (failed.value.status, failed.value.retryable, failed.value.upstream_status) == (
        502,
        False,
        403,
    )
    assert "signature we calculated does not match" in failed.value.message


async def test_an_unknown_key_and_a_wrong_region_are_refused(base_url, client, monkeypatch):
    with pytest.raises(UpstreamError) as region:
        await bedrock(base_url, client, region="eu-west-1").chat(chat_call())
    assert (
        region.value.upstream_status == 403 and "scoped to a valid region" in region.value.message
    )
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWN")
    with pytest.raises(UpstreamError) as unknown:
        await bedrock(base_url, client).chat(chat_call())
    assert unknown.value.upstream_status == 403 and "security token" in unknown.value.message


async def test_session_token_from_the_environment_is_signed(base_url, client, mock, monkeypatch):
    mock.keys["ASIAMOCKTEMPORARY01"] = ("temporary-secret", "session-token-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ASIAMOCKTEMPORARY01")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "temporary-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-1")
    try:
        await bedrock(base_url, client).chat(chat_call())
    finally:
        del mock.keys["ASIAMOCKTEMPORARY01"]
    assert mock.script.received[-1].headers["x-amz-security-token"] == "session-token-1"


async def test_credentials_and_region_from_a_profile_file(
    base_url, client, mock, monkeypatch, tmp_path
):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    (tmp_path / "aws-credentials").write_text(
        f"[default]\naws_access_key_id = AKIAWRONG\naws_secret_access_key = wrong\n\n"
        f"[hub]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
    )
    (tmp_path / "aws-config").write_text(f"[profile hub]\nregion = {REGION}\n")
    # No region on the deployment: the profile's.
    adapter = bedrock(base_url, client, profile="hub", region=None)
    result = await adapter.chat(chat_call())
    assert result.chat_completion().choices[0].message.content == "mock says: hi there"
    assert f"/{REGION}/bedrock/" in mock.script.received[-1].headers["authorization"]
    # The profile named by AWS_PROFILE when the deployment names none.
    monkeypatch.setenv("AWS_PROFILE", "hub")
    await bedrock(base_url, client).chat(chat_call())


async def test_an_unknown_profile_and_no_credentials_are_clear_errors(
    base_url, client, mock, monkeypatch, tmp_path
):
    with pytest.raises(UpstreamError) as unknown:
        await bedrock(base_url, client, profile="nobody").chat(chat_call())
    assert unknown.value.status == 502 and "nobody" in unknown.value.message
    with pytest.raises(UpstreamError) as no_region:
        await bedrock(base_url, client, region=None).chat(chat_call())
    assert "no AWS region" in no_region.value.message
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    adapter = bedrock(base_url, client)
    with pytest.raises(UpstreamError) as none:
        await adapter.chat(chat_call())
    assert none.value.status == 502 and "no AWS credentials" in none.value.message
    assert mock.script.received == []
    # Set up after the first failure (the node still running): found on the next request.
    (tmp_path / "aws-credentials").write_text(
        f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
    )
    await adapter.chat(chat_call())
    assert len(mock.script.received) == 1


async def test_expiring_credentials_are_refreshed_in_a_thread(
    base_url, client, mock, monkeypatch, tmp_path
):
    """Temporary credentials from the chain (here a profile's `credential_process`, expiring
    inside botocore's advisory window) are refreshed by botocore before each request is
    signed, in a thread: never on the event loop."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    runs = tmp_path / "runs"
    script = tmp_path / "credentials.py"
    script.write_text(
        "import datetime, json, pathlib\n"
        f"runs = pathlib.Path({str(runs)!r})\n"
        "runs.write_text(runs.read_text() + 'x' if runs.exists() else 'x')\n"
        "soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=12)\n"
        f"print(json.dumps({{'Version': 1, 'AccessKeyId': {ACCESS_KEY!r}, "
        f"'SecretAccessKey': {SECRET_KEY!r}, 'Expiration': soon.isoformat()}}))\n"
    )
    (tmp_path / "aws-config").write_text(
        f"[profile temporary]\ncredential_process = {sys.executable} {script}\n"
    )
    threads: list[int] = []
    original = bedrock_auth._refresh

    def watched(credentials: Any) -> Any:
        threads.append(threading.get_ident())
        return original(credentials)

    monkeypatch.setattr(bedrock_auth, "_refresh", watched)
    adapter = bedrock(base_url, client, profile="temporary")
    await adapter.chat(chat_call())
    await adapter.chat(chat_call())
    # Loaded once, then refreshed before each of the two requests.
    assert runs.read_text() == "xxx"
    assert len(threads) == 2 and threading.get_ident() not in threads
    assert len(mock.script.received) == 2


async def test_a_bedrock_api_key_replaces_sigv4(base_url, client, mock):
    await bedrock(base_url, client, api_key=API_KEY).chat(chat_call())
    assert mock.script.received[-1].headers["authorization"] == f"Bearer {API_KEY}"
    with pytest.raises(UpstreamError) as wrong:
        await bedrock(base_url, client, api_key="ABSKwrong").chat(chat_call())
    assert wrong.value.upstream_status == 403


async def test_an_inference_profile_arn_is_encoded_in_the_path(base_url, client, mock):
    arn = "arn:aws:bedrock:us-mock-1:123456789012:inference-profile/us.anthropic.claude-mock"
    mock.models.add(arn)
    try:
        await bedrock(base_url, client, model=arn).chat(chat_call())
    finally:
        mock.models.discard(arn)
    assert mock.script.received[-1].path == (
        "/model/arn%3Aaws%3Abedrock%3Aus-mock-1%3A123456789012%3Ainference-profile%2F"
        "us.anthropic.claude-mock/converse"
    )


async def test_the_endpoint_is_the_regions_without_base_url(client):
    adapter = BedrockAdapter(
        Upstream(provider="bedrock", model=MODEL, region="eu-central-2"), client
    )
    assert await adapter.url("converse") == (
        "https://bedrock-runtime.eu-central-2.amazonaws.com/model/anthropic.claude-mock-v1%3A0/converse"
    )


async def test_the_mock_checks_signatures_itself(base_url):
    async with httpx.AsyncClient() as plain:
        url = base_url + "/model/anthropic.claude-mock-v1%3A0/converse"
        body = {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}
        unsigned = await plain.post(url, json=body)
        assert unsigned.status_code == 403
        assert unsigned.headers["x-amzn-errortype"].startswith(
            "MissingAuthenticationTokenException"
        )
        forged = await plain.post(
            url,
            json=body,
            headers={
                "authorization": (
                    f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/20261201/{REGION}/bedrock/"
                    "aws4_request, SignedHeaders=host;x-amz-date, Signature=00"
                ),
                "x-amz-date": "20200101T000000Z",
            },
        )
        assert forged.status_code == 403 and "expired" in forged.json()["message"]


# --- config -----------------------------------------------------------------------------------


def test_the_templates_bedrock_example_is_a_valid_deployment():
    start = CONFIG_TEMPLATE.index('# [[models]]\n# name = "claude-bedrock"')
    block = CONFIG_TEMPLATE[start:].split("\n\n")[0]
    uncommented = "\n".join(line.removeprefix("# ") for line in block.splitlines())
    config = parse_config(render_template("n").encode() + b"\n" + uncommented.encode())
    [deployment] = [d for d in config.models if d.provider == "bedrock"]
    assert (deployment.region, deployment.profile) == ("us-east-1", "default")


def test_config_takes_bedrock_deployments_and_refuses_what_does_not_fit():
    base = '[node]\nname = "n"\n[[models]]\nname = "c"\nprovider = "bedrock"\n'
    config = parse_config(
        (base + 'model = "m:0"\nregion = "us-west-2"\nprofile = "prod"\n').encode()
    )
    upstream = config.models[0].upstream(config.upstream, {})
    assert (upstream.provider, upstream.region, upstream.profile) == (
        "bedrock",
        "us-west-2",
        "prod",
    )
    with pytest.raises(ConfigError, match="region"):
        parse_config((base + 'region = "us-west-2.evil.test"\n').encode())
    with pytest.raises(ConfigError, match="serves no embeddings"):
        parse_config((base + 'kind = "embeddings"\n').encode())
    with pytest.raises(ConfigError, match="for a bedrock deployment"):
        parse_config(
            b'[node]\nname = "n"\n[[models]]\nname = "e"\nprovider = "echo"\nregion = "us-east-1"\n'
        )


# --- through real nodes -----------------------------------------------------------------------


def _deployment(base_url: str, name: str = "claude-bedrock") -> str:
    return f"""
[[models]]
name = "{name}"
provider = "bedrock"
model = "{MODEL}"
base_url = "{base_url}"
region = "{REGION}"
max_output_tokens = 1024
price_in = 3_000_000
price_out = 15_000_000
"""


HELLO = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello there"}]


def test_openai_sdk_through_a_node(node_dir: NodeDir, base_url, mock):
    node_dir.add_config(_deployment(base_url))
    with run_node(node_dir) as node:
        sdk = openai.OpenAI(base_url=node.url + "/v1", api_key=node.key, max_retries=0)
        raw = sdk.with_raw_response.chat.completions.create(model="claude-bedrock", messages=HELLO)
        reply = raw.parse()
        stream = sdk.chat.completions.create(
            model="claude-bedrock",
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
        )
        streamed = list(stream)
        tools = sdk.chat.completions.create(
            model="claude-bedrock",
            messages=[{"role": "user", "content": "weather in Paris?"}],
            tools=[WEATHER_TOOL],
        )
        tool_stream = list(
            sdk.chat.completions.create(
                model="claude-bedrock",
                messages=[{"role": "user", "content": "weather in Paris?"}],
                tools=[WEATHER_TOOL],
                tool_choice="required",
                stream=True,
            )
        )
    assert reply.choices[0].message.content == "mock says: hello there"
    # The mock counts the system prompt's words too: 2 + (2 + 3).
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (7, 4)
    # 7 tokens at $3/1M in and 4 at $15/1M out: 81 micro-units.
    assert raw.headers["aihub-cost-micros"] == "81"
    assert (
        "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        == "mock says: hello there"
    )
    assert streamed[-1].usage is not None and streamed[-1].usage.completion_tokens == 4
    [call] = tools.choices[0].message.tool_calls or []
    assert tools.choices[0].finish_reason == "tool_calls"
    assert (call.function.name, msgspec.json.decode(call.function.arguments)) == (
        "get_weather",
        {"city": "Paris"},
    )
    fragments = [t for c in tool_stream if c.choices for t in c.choices[0].delta.tool_calls or ()]
    assert "".join(f.function.arguments or "" for f in fragments) == '{"city": "Paris"}'
    assert [c.choices[0].finish_reason for c in tool_stream if c.choices][-1] == "tool_calls"


def test_a_throttled_bedrock_is_retried_then_a_wrong_secret_is_a_502(
    node_dir: NodeDir, base_url, mock, monkeypatch
):
    node_dir.add_config(_deployment(base_url))
    node_dir.set_router("retries = 2\nbackoff_base = 0.01\nbackoff_max = 0.02")
    with run_node(node_dir) as node:
        sdk = openai.OpenAI(base_url=node.url + "/v1", api_key=node.key, max_retries=0)
        mock.script.fail_next(THROTTLING, times=2)
        reply = sdk.chat.completions.create(model="claude-bedrock", messages=HELLO)
        assert reply.choices[0].message.content == "mock says: hello there"
        assert len(mock.script.received) == 3
        mock.script.fail_next(VALIDATION)
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.chat.completions.create(model="claude-bedrock", messages=HELLO)
        assert len(mock.script.received) == 4  # the client's own fault: never retried
        assert "Malformed input request" in refused.value.message
        # Throttled inside the stream, before any content: retried, and the client sees
        # only the answer.
        mock.fail_stream_next("throttlingException", "Too many tokens, please wait.", after=1)
        streamed = list(
            sdk.chat.completions.create(model="claude-bedrock", messages=HELLO, stream=True)
        )
        assert len(mock.script.received) == 6
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == (
            "mock says: hello there"
        )
        # The model fails after content was sent: an error in the stream, in OpenAI's shape.
        mock.fail_stream_next("modelStreamErrorException", "The model broke.", after=3)
        with pytest.raises(openai.APIError) as broken:
            list(sdk.chat.completions.create(model="claude-bedrock", messages=HELLO, stream=True))
        assert "The model broke." in broken.value.message
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        # A new node process would resolve the chain again; this one keeps what it resolved.
    with run_node(node_dir) as node:
        sdk = openai.OpenAI(base_url=node.url + "/v1", api_key=node.key, max_retries=0)
        with pytest.raises(openai.APIStatusError) as failed:
            sdk.chat.completions.create(model="claude-bedrock", messages=HELLO)
    assert failed.value.status_code == 502
    assert "signature" in failed.value.message


def test_a_spent_quota_falls_back_and_a_guardrail_does_not(node_dir: NodeDir, base_url, mock):
    node_dir.add_config(_deployment(base_url))
    node_dir.add_config('[[models]]\nname = "claude-bedrock"\nprovider = "echo"\npriority = 1')
    with run_node(node_dir) as node:
        sdk = openai.OpenAI(base_url=node.url + "/v1", api_key=node.key, max_retries=0)
        mock.script.fail_next(QUOTA)
        reply = sdk.chat.completions.create(model="claude-bedrock", messages=HELLO)
        # Tried once (a quota is not retried), then the next deployment answered.
        assert len(mock.script.received) == 1
        assert reply.choices[0].message.content == "echo: hello there"
        # A guardrail's block is an answer, not a failure: no fallback.
        mock.stop_reason = "guardrail_intervened"
        blocked = sdk.chat.completions.create(model="claude-bedrock", messages=HELLO)
        assert blocked.choices[0].finish_reason == "content_filter"
        assert len(mock.script.received) == 2


def test_messages_and_responses_clients_through_a_node(node_dir: NodeDir, base_url, mock):
    node_dir.add_config(_deployment(base_url))
    hello = [{"role": "user", "content": "hello there"}]
    with run_node(node_dir) as node:
        with anthropic.Anthropic(base_url=node.url, api_key=node.key, max_retries=0) as claude:
            message = claude.messages.create(
                model="claude-bedrock", max_tokens=64, system="be kind", messages=hello
            )
            with claude.messages.stream(
                model="claude-bedrock", max_tokens=64, messages=hello
            ) as stream:
                text = "".join(stream.text_stream)
                final = stream.get_final_message()
            tool_use = claude.messages.create(
                model="claude-bedrock",
                max_tokens=64,
                messages=[{"role": "user", "content": "weather?"}],
                tools=[
                    {"name": "get_weather", "input_schema": WEATHER_TOOL["function"]["parameters"]}
                ],
                tool_choice={"type": "any"},
            )
        sdk = openai.OpenAI(base_url=node.url + "/v1", api_key=node.key, max_retries=0)
        response = sdk.responses.create(
            model="claude-bedrock", input="hello there", instructions="be kind"
        )
        with sdk.responses.stream(model="claude-bedrock", input="hello there") as events:
            deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
            completed = events.get_final_response()
    assert message.content[0].text == text == "mock says: hello there"
    assert message.stop_reason == final.stop_reason == "end_turn"
    assert message.usage.input_tokens == 7
    assert last_sent(mock)["messages"][0]["content"] == [{"text": "hello there"}]
    [block] = tool_use.content
    assert tool_use.stop_reason == "tool_use"
    assert (block.type, block.name, block.input) == ("tool_use", "get_weather", {"city": "Paris"})
    assert response.output_text == "mock says: hello there"
    assert "".join(deltas) == completed.output_text == "mock says: hello there"


def test_bedrock_through_a_peer(tmp_path, base_url, mock):
    """Bob's client uses a Bedrock model only alice serves: alice signs for AWS with her
    credentials; bob never sees them and pays alice for the call."""
    alice = make_peer(tmp_path, "alice", _deployment(base_url))
    bob = make_peer(tmp_path, "bob")
    with alice.run(), bob.run() as b:
        cli("join", invite(alice, "--models", "claude-bedrock"), "--data-dir", str(bob.path))
        assert wait_for(lambda: model_owners(b).get("claude-bedrock") == "alice")
        sdk = openai.OpenAI(base_url=b.url + "/v1", api_key=b.key, max_retries=0)
        reply = sdk.chat.completions.create(model="claude-bedrock", messages=HELLO)
        streamed = list(
            sdk.chat.completions.create(model="claude-bedrock", messages=HELLO, stream=True)
        )
        assert reply.choices[0].message.content == "mock says: hello there"
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == (
            "mock says: hello there"
        )
        assert all(
            r.headers["authorization"].startswith("AWS4-HMAC-SHA256") for r in mock.script.received
        )
        assert wait_for(lambda: len([r for r in usage_rows(alice.path) if r.status == 200]) == 2)
        assert wait_for(
            lambda: (
                len([r for r in usage_rows(bob.path) if r.deployment == "claude-bedrock@alice"])
                == 2
            )
        )
