"""The Anthropic adapter against a mock that speaks Anthropic's Messages API wire format."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import msgspec
import pytest

from adapters.anthropic import AnthropicAdapter
from adapters.http import UpstreamClient
from adapters.tokens import estimate_prompt_tokens, estimate_text_tokens
from adapters.types import (
    Upstream,
    UpstreamError,
    Usage,
)
from tests.calls import body_of, chat_call, chunks, collect, embed_call, last_sent
from tests.conftest import NodeDir, run_node
from tests.mocks.anthropic_mock import (
    API_ERROR,
    AUTHENTICATION,
    INVALID_REQUEST,
    NOT_FOUND,
    OVERLOADED,
    PERMISSION,
    PROMPT_TOO_LONG,
    RATE_LIMITED,
    AnthropicMock,
)
from tests.mocks.script import Failure
from tests.mocks.server import serve_app

KEY = "sk-ant-mock"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        "strict": True,
    },
}
CLOCK_TOOL = {"type": "function", "function": {"name": "get_time"}}
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}


@pytest.fixture(scope="module")
def mock() -> AnthropicMock:
    return AnthropicMock(models=("claude-mock",), api_key=KEY)


@pytest.fixture(scope="module")
def base_url(mock: AnthropicMock) -> Iterator[str]:
    with serve_app(mock) as url:
        yield url


@pytest.fixture(autouse=True)
def fresh_mock(mock: AnthropicMock) -> None:
    mock.reset()


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    async with UpstreamClient() as client:
        yield client


def anthropic(
    base_url: str, client: UpstreamClient, model: str = "claude-mock", **fields: Any
) -> AnthropicAdapter:
    fields.setdefault("api_key", KEY)
    return AnthropicAdapter(
        Upstream(provider="anthropic", model=model, base_url=base_url, **fields), client
    )


def streamed_text(parsed: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in parsed if c["choices"])


def text(value: str) -> dict[str, str]:
    return {"type": "text", "text": value}


# --- request translation --------------------------------------------------------------------


async def test_request_is_translated_to_anthropics_format(base_url, client, mock):
    call = chat_call(
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "developer", "content": [{"type": "text", "text": "answer in French"}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
                    },
                    {"type": "image_url", "image_url": {"url": "https://x.test/a.webp"}},
                ],
            },
        ],
        max_tokens=50,
        temperature=0.2,
        top_p=0.9,
        stop="END",
        user="user-42",
        # Fields Anthropic has no place for are dropped, not sent to be refused.
        seed=7,
        presence_penalty=0.5,
        n=1,
        response_format={"type": "json_object"},
        service_tier="flex",
    )
    await anthropic(base_url, client).chat(call)
    assert mock.script.received[-1].path == "/v1/messages"
    assert last_sent(mock) == {
        "model": "claude-mock",
        "max_tokens": 50,
        "messages": [
            {
                "role": "user",
                "content": [
                    text("what is this?"),
                    {
                        "type": "image",
                        "source": {
                            "type": "base64",
                            "media_type": "image/png",
                            "data": "iVBORw0KGgo=",
                        },
                    },
                    {"type": "image", "source": {"type": "url", "url": "https://x.test/a.webp"}},
                ],
            }
        ],
        "system": "be brief\n\nanswer in French",
        "stop_sequences": ["END"],
        "temperature": 0.2,
        "top_p": 0.9,
        "metadata": {"user_id": "user-42"},
    }


async def test_non_base64_data_url_is_encoded(base_url, client, mock):
    # The mock refuses SVG, as Anthropic does; the adapter's encoding is what is checked.
    svg = "data:image/gif,GIF89a%01"
    call = chat_call(
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": svg}}]}]
    )
    await anthropic(base_url, client).chat(call)
    assert last_sent(mock)["messages"][0]["content"] == [
        {
            "type": "image",
            "source": {
                "type": "base64",
                "media_type": "image/gif",
                "data": base64.b64encode(b"GIF89a\x01").decode(),
            },
        }
    ]


async def test_headers_and_path(base_url, client, mock):
    await anthropic(base_url, client).chat(chat_call())
    received = mock.script.received[-1]
    assert received.path == "/v1/messages"
    assert received.headers["x-api-key"] == KEY
    assert received.headers["anthropic-version"] == "2023-06-01"
    assert received.headers["content-type"] == "application/json"
    assert "authorization" not in received.headers
    # A base URL given with `/v1`, as for OpenAI-style servers, reaches the same path.
    await anthropic(base_url + "/v1/", client).chat(chat_call())
    assert mock.script.received[-1].path == "/v1/messages"
    # A deployment can pin another API version; the mock knows only one, and says so.
    with pytest.raises(UpstreamError) as caught:
        await anthropic(base_url, client, api_version="2099-01-01").chat(chat_call())
    assert mock.script.received[-1].headers["anthropic-version"] == "2099-01-01"
    assert "anthropic-version" in caught.value.message


async def test_max_tokens_is_always_sent_and_capped_by_the_deployment(base_url, client, mock):
    adapter = anthropic(base_url, client, max_output_tokens=16)
    await adapter.chat(chat_call())
    assert last_sent(mock)["max_tokens"] == 16
    await adapter.chat(chat_call(max_completion_tokens=100))
    assert last_sent(mock)["max_tokens"] == 16
    await adapter.chat(chat_call(max_tokens=3))
    assert last_sent(mock)["max_tokens"] == 3
    await anthropic(base_url, client).chat(chat_call())
    assert last_sent(mock)["max_tokens"] == 4096


async def test_temperature_above_anthropics_range_is_clamped(base_url, client, mock):
    await anthropic(base_url, client).chat(chat_call(temperature=1.7))
    assert last_sent(mock)["temperature"] == 1.0


async def test_tools_are_offered_in_anthropics_shape(base_url, client, mock):
    await anthropic(base_url, client).chat(chat_call(tools=[WEATHER_TOOL, CLOCK_TOOL]))
    sent = last_sent(mock)
    assert sent["tools"] == [
        {
            "name": "get_weather",
            "input_schema": WEATHER_SCHEMA,
            "description": "The weather in a city",
        },
        {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in sent


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"tool_choice": "auto"}, {"type": "auto"}),
        ({"tool_choice": "required"}, {"type": "any"}),
        ({"tool_choice": "none"}, {"type": "none"}),
        (
            {"tool_choice": {"type": "function", "function": {"name": "get_time"}}},
            {"type": "tool", "name": "get_time"},
        ),
        ({"parallel_tool_calls": False}, {"type": "auto", "disable_parallel_tool_use": True}),
        (
            {"tool_choice": "required", "parallel_tool_calls": False},
            {"type": "any", "disable_parallel_tool_use": True},
        ),
        ({"parallel_tool_calls": True}, None),
    ],
)
async def test_tool_choice(base_url, client, mock, fields, expected):
    await anthropic(base_url, client).chat(chat_call(tools=[WEATHER_TOOL, CLOCK_TOOL], **fields))
    assert last_sent(mock).get("tool_choice") == expected
    # `none` still offers the tools, so that earlier calls in the history make sense.
    assert len(last_sent(mock)["tools"]) == 2


async def test_tool_choice_without_tools_is_not_sent(base_url, client, mock):
    await anthropic(base_url, client).chat(chat_call(tool_choice="required"))
    assert "tools" not in last_sent(mock) and "tool_choice" not in last_sent(mock)


async def test_tool_round_trip_merges_results_into_one_user_turn(base_url, client, mock):
    call = chat_call(
        tools=[WEATHER_TOOL, CLOCK_TOOL],
        messages=[
            {"role": "user", "content": "weather and time in Paris?"},
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    {
                        "id": "toolu_a",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "toolu_b",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": ""},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_a", "content": "18 degrees"},
            {
                "role": "tool",
                "tool_call_id": "toolu_b",
                "content": [{"type": "text", "text": "noon"}],
            },
            {"role": "user", "content": "and so?"},
        ],
    )
    result = await anthropic(base_url, client).chat(call)
    assert last_sent(mock)["messages"] == [
        {"role": "user", "content": [text("weather and time in Paris?")]},
        {
            "role": "assistant",
            "content": [
                text("Let me check."),
                {
                    "type": "tool_use",
                    "id": "toolu_a",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
                {"type": "tool_use", "id": "toolu_b", "name": "get_time", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_a", "content": "18 degrees"},
                {"type": "tool_result", "tool_use_id": "toolu_b", "content": "noon"},
                text("and so?"),
            ],
        },
    ]
    answer = msgspec.json.decode(body_of(result))["choices"][0]
    assert answer["message"]["content"] == "mock says: 18 degrees noon and so?"
    assert answer["finish_reason"] == "stop"


async def test_consecutive_messages_of_one_role_are_merged(base_url, client, mock):
    call = chat_call(
        messages=[
            {"role": "user", "content": "first"},
            {"role": "system", "content": "late system words"},
            {"role": "user", "content": "second"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "third"},
        ]
    )
    await anthropic(base_url, client).chat(call)
    sent = last_sent(mock)
    # The empty assistant turn says nothing, and Anthropic refuses empty text blocks.
    assert sent["messages"] == [
        {"role": "user", "content": [text("first"), text("second"), text("third")]}
    ]
    assert sent["system"] == "late system words"


@pytest.mark.parametrize(
    ("message", "complaint"),
    [
        (
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AA"}}]},
            "input_audio",
        ),
        (
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "ftp://x.test/a.png"}}],
            },
            "http(s) URL or a data: URL",
        ),
        (
            {
                "role": "system",
                "content": [{"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}],
            },
            "system prompt can hold text only",
        ),
        (
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[1]"}}
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
        ({"role": "tool", "content": "18 degrees"}, "tool_call_id"),
    ],
)
async def test_what_anthropic_cannot_take_is_refused_before_sending(
    base_url, client, mock, message, complaint
):
    call = chat_call(messages=[message, {"role": "user", "content": "go"}])
    with pytest.raises(UpstreamError) as caught:
        await anthropic(base_url, client).chat(call)
    assert (caught.value.status, caught.value.type) == (400, "invalid_request_error")
    assert not caught.value.retryable
    assert complaint in caught.value.message
    assert mock.script.received == []


# --- plain answers ----------------------------------------------------------------------------


async def test_plain_answer(base_url, client):
    result = await anthropic(base_url, client).chat(chat_call())
    body = msgspec.json.decode(body_of(result))
    assert body["id"] == "req-1"
    assert body["object"] == "chat.completion"
    assert body["model"] == "claude-mock"
    assert isinstance(body["created"], int)
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "mock says: hi there"},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ]
    # The mock counts a message's words plus 3, and one token per word of the answer.
    assert result.usage == Usage(5, 4, 9)
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    assert not result.usage_estimated


async def test_cached_prompt_tokens_count_as_prompt_tokens(base_url, client, mock):
    mock.cache_read, mock.cache_write = 100, 20
    result = await anthropic(base_url, client).chat(chat_call())
    assert result.usage == Usage(125, 4, 129)
    stream = await anthropic(base_url, client).open_stream(chat_call(stream=True))
    _, error = await collect(stream)
    assert error is None
    assert stream.usage == Usage(125, 4, 129)


async def test_max_tokens_finish_is_length(base_url, client):
    result = await anthropic(base_url, client).chat(chat_call(max_tokens=2))
    choice = msgspec.json.decode(body_of(result))["choices"][0]
    assert choice["message"]["content"] == "mock says:"
    assert choice["finish_reason"] == "length"
    assert result.usage.completion_tokens == 2


async def test_stop_sequence_finish_is_stop(base_url, client, mock):
    result = await anthropic(base_url, client).chat(chat_call(stop=["there"]))
    choice = msgspec.json.decode(body_of(result))["choices"][0]
    assert last_sent(mock)["stop_sequences"] == ["there"]
    assert choice["message"]["content"] == "mock says: hi"
    assert choice["finish_reason"] == "stop"


async def test_tool_call_answer(base_url, client):
    result = await anthropic(base_url, client).chat(chat_call(tools=[WEATHER_TOOL, CLOCK_TOOL]))
    choice = msgspec.json.decode(body_of(result))["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."
    assert choice["message"]["tool_calls"] == [
        {
            "type": "function",
            "id": "toolu_mock00010",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        },
        {
            "type": "function",
            "id": "toolu_mock00011",
            "function": {"name": "get_time", "arguments": "{}"},
        },
    ]
    assert result.usage.completion_tokens == 3 + 20


async def test_forced_tool_call_has_null_content(base_url, client):
    named = {"type": "function", "function": {"name": "get_time"}}
    result = await anthropic(base_url, client).chat(
        chat_call(tools=[WEATHER_TOOL, CLOCK_TOOL], tool_choice=named)
    )
    message = msgspec.json.decode(body_of(result))["choices"][0]["message"]
    assert message.get("content") is None
    assert [call["function"]["name"] for call in message["tool_calls"]] == ["get_time"]


# --- streams ----------------------------------------------------------------------------------


async def test_stream_of_text(base_url, client, mock):
    stream = await anthropic(base_url, client).open_stream(chat_call(stream=True))
    events, error = await collect(stream)
    assert error is None
    assert last_sent(mock)["stream"] is True
    parsed = chunks(events)
    assert all(c["object"] == "chat.completion.chunk" for c in parsed)
    assert {(c["id"], c["model"], c["created"]) for c in parsed} == {
        ("req-1", "claude-mock", parsed[0]["created"])
    }
    assert parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert streamed_text(parsed) == "mock says: hi there"
    assert len(parsed) == 1 + 4 + 1  # role, one chunk per word, finish
    assert parsed[-1]["choices"] == [
        {"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}
    ]
    assert all("usage" not in c for c in parsed)
    assert stream.usage == Usage(5, 4, 9)
    assert not stream.usage_estimated


async def test_stream_sends_usage_only_when_asked(base_url, client):
    call = chat_call(stream=True, stream_options={"include_usage": True})
    stream = await anthropic(base_url, client).open_stream(call)
    events, error = await collect(stream)
    assert error is None
    parsed = chunks(events)
    assert parsed[-1]["choices"] == []
    assert parsed[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    assert parsed[-2]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c for c in parsed[:-1])


async def test_stream_of_tool_calls_in_fragments(base_url, client):
    call = chat_call(stream=True, tools=[WEATHER_TOOL, CLOCK_TOOL])
    stream = await anthropic(base_url, client).open_stream(call)
    events, error = await collect(stream)
    assert error is None
    parsed = chunks(events)
    deltas = [c["choices"][0]["delta"] for c in parsed]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert streamed_text(parsed) == "Let me check."
    calls = [call for delta in deltas for call in delta.get("tool_calls", [])]
    # Anthropic's blocks 1 and 2 (block 0 is the text) are OpenAI's tool calls 0 and 1; the
    # first chunk of each names it, the rest carry argument fragments only.
    assert calls == [
        {
            "type": "function",
            "function": {"name": "get_weather", "arguments": ""},
            "id": "toolu_mock00010",
            "index": 0,
        },
        {"type": "function", "function": {"arguments": '{"city": '}, "index": 0},
        {"type": "function", "function": {"arguments": '"Par'}, "index": 0},
        {"type": "function", "function": {"arguments": 'is"}'}, "index": 0},
        {
            "type": "function",
            "function": {"name": "get_time", "arguments": ""},
            "id": "toolu_mock00011",
            "index": 1,
        },
        # A call without arguments still gets a JSON object, as OpenAI's clients expect.
        {"type": "function", "function": {"arguments": "{}"}, "index": 1},
    ]
    arguments = ["", ""]
    for call in calls:
        arguments[call["index"]] += call["function"]["arguments"]
    assert [msgspec.json.decode(a) for a in arguments] == [{"city": "Paris"}, {}]
    assert parsed[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert stream.usage is not None and stream.usage.completion_tokens == 23


async def test_stream_length_finish(base_url, client):
    stream = await anthropic(base_url, client).open_stream(chat_call(stream=True, max_tokens=3))
    events, error = await collect(stream)
    assert error is None
    parsed = chunks(events)
    assert streamed_text(parsed) == "mock says: hi"
    assert parsed[-1]["choices"][0]["finish_reason"] == "length"
    assert stream.usage is not None and stream.usage.completion_tokens == 3


async def test_error_event_mid_stream(base_url, client, mock):
    # message_start, ping, content_block_start, two text deltas, then the error.
    mock.fail_stream_next("overloaded_error", "Overloaded", after=5)
    call = chat_call(stream=True)
    stream = await anthropic(base_url, client).open_stream(call)
    events, error = await collect(stream)
    assert error is not None
    assert (error.status, error.code, error.retryable) == (502, "overloaded_error", True)
    assert "Overloaded" in error.message
    assert streamed_text(chunks(events)) == "mock says:"
    # message_start's input count is kept; the output is estimated from what arrived.
    assert stream.usage == Usage(5, estimate_text_tokens("mock says:"), 5 + 3)
    assert stream.usage_estimated


async def test_rate_limit_error_event_is_a_429(base_url, client, mock):
    mock.fail_stream_next("rate_limit_error", "Number of request tokens has exceeded", after=4)
    stream = await anthropic(base_url, client).open_stream(chat_call(stream=True))
    _, error = await collect(stream)
    assert error is not None
    assert (error.status, error.code, error.retryable) == (429, "rate_limit_exceeded", True)


async def test_error_before_any_content_comes_before_any_event(base_url, client, mock):
    # Anthropic's overload often arrives right after message_start and a ping.
    mock.fail_stream_next("overloaded_error", "Overloaded", after=2)
    stream = await anthropic(base_url, client).open_stream(chat_call(stream=True))
    events = aiter(stream)
    with pytest.raises(UpstreamError) as caught:
        await anext(events)
    # Nothing reached the client yet, so the router may still try another deployment.
    assert caught.value.retryable
    assert "Overloaded" in caught.value.message
    await stream.aclose()


async def test_stream_cut_without_message_stop_is_an_error(base_url, client, mock):
    # Everything but the final message_stop: even message_delta arrived.
    mock.script.cut_stream_after = 9
    stream = await anthropic(base_url, client).open_stream(chat_call(stream=True))
    events, error = await collect(stream)
    assert error is not None and "ended early" in error.message
    assert error.status == 502 and error.retryable
    parsed = chunks(events)
    assert streamed_text(parsed) == "mock says: hi there"
    assert all(c["choices"][0]["finish_reason"] is None for c in parsed)
    # Anthropic's own count from message_delta is kept, but the whole is marked estimated.
    assert stream.usage == Usage(5, 4, 9) and stream.usage_estimated


async def test_aclose_hangs_up_on_anthropic(base_url, client, mock):
    mock.script.chunk_delay = 0.2
    stream = await anthropic(base_url, client).open_stream(chat_call(stream=True))
    events = aiter(stream)
    await anext(events)
    await stream.aclose()
    for _ in range(100):
        if mock.script.cancelled:
            break
        await asyncio.sleep(0.02)
    assert mock.script.cancelled == 1


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "status", "type_", "code", "retryable", "words"),
    [
        (INVALID_REQUEST, 400, "invalid_request_error", "invalid_request_error", False, "field"),
        (AUTHENTICATION, 502, "upstream_error", "authentication_error", False, "x-api-key"),
        (PERMISSION, 502, "upstream_error", "permission_error", False, "permission"),
        (NOT_FOUND, 404, "invalid_request_error", "model_not_found", False, "claude-nope"),
        (RATE_LIMITED, 429, "upstream_error", "rate_limit_exceeded", True, "rate limit"),
        (API_ERROR, 502, "upstream_error", "api_error", True, "Internal server error"),
        (OVERLOADED, 502, "upstream_error", "overloaded_error", True, "Overloaded"),
        (
            PROMPT_TOO_LONG,
            400,
            "invalid_request_error",
            "context_length_exceeded",
            False,
            "prompt is too long",
        ),
    ],
)
async def test_error_answers(
    base_url, client, mock, failure, status, type_, code, retryable, words
):
    adapter = anthropic(base_url, client)
    mock.script.fail_next(failure, times=2)
    for attempt in (adapter.chat(chat_call()), adapter.open_stream(chat_call(stream=True))):
        with pytest.raises(UpstreamError) as caught:
            await attempt
        error = caught.value
        assert (error.status, error.type, error.code) == (status, type_, code)
        assert error.retryable is retryable
        assert error.upstream_status == failure.status
        assert words in error.message
        expected_wait = 7.0 if failure is RATE_LIMITED else None
        assert error.retry_after == expected_wait


async def test_real_refusals_of_the_mock(base_url, client, mock):
    with pytest.raises(UpstreamError) as caught:
        await anthropic(base_url, client, model="claude-nope").chat(chat_call())
    assert (caught.value.status, caught.value.code) == (404, "model_not_found")
    with pytest.raises(UpstreamError) as caught:
        await anthropic(base_url, client, api_key="sk-wrong").chat(chat_call())
    assert (caught.value.status, caught.value.code) == (502, "authentication_error")
    assert not caught.value.retryable


async def test_an_error_body_that_is_not_anthropics(base_url, client, mock):
    mock.script.fail_next(Failure(502, b"<html>Bad Gateway</html>"))
    with pytest.raises(UpstreamError) as caught:
        await anthropic(base_url, client).chat(chat_call())
    assert "<html>Bad Gateway</html>" in caught.value.message
    assert (caught.value.status, caught.value.code, caught.value.retryable) == (502, None, True)


async def test_slow_anthropic_times_out(base_url, client, mock):
    mock.script.delay = 2
    with pytest.raises(UpstreamError) as caught:
        await anthropic(base_url, client, read_timeout=0.2).chat(chat_call())
    assert (caught.value.status, caught.value.retryable, caught.value.type) == (
        504,
        True,
        "timeout",
    )


async def test_embeddings_are_refused_without_a_call(base_url, client, mock):
    with pytest.raises(UpstreamError) as caught:
        await anthropic(base_url, client).embed(embed_call(input="x"))
    assert (caught.value.status, caught.value.type) == (400, "invalid_request_error")
    assert "serves no embeddings" in caught.value.message
    assert mock.script.received == []


async def test_usage_is_estimated_when_a_stream_dies_at_once(base_url, client, mock):
    mock.script.cut_stream_after = 0
    call = chat_call(stream=True)
    stream = await anthropic(base_url, client).open_stream(call)
    events, error = await collect(stream)
    assert events == [] and error is not None
    prompt = estimate_prompt_tokens(call.request.messages)
    assert stream.usage == Usage(prompt, 0, prompt) and stream.usage_estimated


# --- the mock itself --------------------------------------------------------------------------


async def test_mock_is_as_strict_as_anthropic(base_url):
    async with httpx.AsyncClient() as client:  # a plain client, to check the mock itself
        headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
        url = base_url + "/v1/messages"
        no_max = {"model": "claude-mock", "messages": [{"role": "user", "content": "hi"}]}
        response = await client.post(url, json=no_max, headers=headers)
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert "max_tokens" in response.json()["error"]["message"]
        unknown = {**no_max, "max_tokens": 5, "n": 2}
        assert (await client.post(url, json=unknown, headers=headers)).status_code == 400
        orphan = {
            **no_max,
            "max_tokens": 5,
            "messages": [
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x"}]}
            ],
        }
        response = await client.post(url, json=orphan, headers=headers)
        assert response.status_code == 400 and "toolu_x" in response.json()["error"]["message"]
        response = await client.post(
            url, json={**no_max, "max_tokens": 5}, headers={"x-api-key": KEY}
        )
        assert response.status_code == 400
        ok = await client.post(url, json={**no_max, "max_tokens": 5}, headers=headers)
        assert ok.status_code == 200 and ok.json()["stop_reason"] == "end_turn"


# --- through a real node ----------------------------------------------------------------------


def test_chat_through_a_node(node_dir: NodeDir, base_url, mock, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_MOCK_KEY", KEY)
    node_dir.add_config(
        f"""
[[models]]
name = "claude"
provider = "anthropic"
model = "claude-mock"
base_url = "{base_url}"
api_key_env = "ANTHROPIC_MOCK_KEY"
max_output_tokens = 1024
price_in = 3_000_000
price_out = 15_000_000
"""
    )
    hello = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello there"}]
    with run_node(node_dir) as node, node.client() as client:
        response = client.post("/v1/chat/completions", json={"model": "claude", "messages": hello})
        assert response.status_code == 200, response.text
        sent = last_sent(mock)
        body = {
            "model": "claude",
            "messages": hello,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with client.stream("POST", "/v1/chat/completions", json=body) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in streamed.iter_lines() if line.startswith("data: ")]
    answer = response.json()
    assert answer["choices"][0]["message"] == {
        "role": "assistant",
        "content": "mock says: hello there",
    }
    # The mock counts the system prompt's words too: 2 + (2 + 3).
    assert answer["usage"] == {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}
    # 7 tokens at $3/1M in and 4 at $15/1M out: 81 micro-units.
    assert response.headers["aihub-cost-micros"] == "81"
    assert sent["system"] == "be kind" and sent["max_tokens"] == 1024
    assert mock.script.received[-1].headers["x-api-key"] == KEY
    assert lines[-1] == "data: [DONE]"
    parsed = [msgspec.json.decode(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in parsed if c["choices"]) == (
        "mock says: hello there"
    )
    assert parsed[-2]["choices"][0]["finish_reason"] == "stop"
    assert parsed[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}
