"""The Gemini adapter against a mock that speaks the Gemini API's wire format; through real
nodes with the official SDKs (chat completions, Messages, Responses, and across a peer)."""

from __future__ import annotations

import asyncio
import base64
import itertools
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import httpx
import msgspec
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.events import Finish, TextDelta, ToolCallDelta
from adapters.gemini import GeminiAdapter, GeminiStream, completion_of
from adapters.gemini_request import call_id_with_signature, chat_body, signature_of
from adapters.gemini_wire import GenerateContentResponse
from adapters.http import UpstreamClient
from adapters.tokens import estimate_prompt_tokens, estimate_text_tokens
from adapters.types import Upstream, UpstreamError, Usage
from tests.calls import body_of, chat_call, chunks, collect, embed_call, last_sent
from tests.conftest import NodeDir, run_node
from tests.mocks.gemini_mock import (
    API_KEY_INVALID,
    DEADLINE_EXCEEDED,
    FAILED_PRECONDITION,
    INTERNAL,
    INVALID_ARGUMENT,
    NOT_FOUND,
    PERMISSION_DENIED,
    RESOURCE_EXHAUSTED,
    SIGNATURE,
    TOO_LONG,
    UNAVAILABLE,
    GeminiMock,
)
from tests.mocks.gemini_mock import _Request as MockRequest
from tests.mocks.script import Failure
from tests.mocks.server import serve_app
from tests.test_federation import cli, invite, make_peer, model_owners, usage_rows, wait_for

KEY = "gm-mock-key"
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": WEATHER_SCHEMA,
        "strict": True,
    },
}
CLOCK_TOOL = {"type": "function", "function": {"name": "get_time"}}
PNG = "data:image/png;base64,iVBORw0KGgo="


@pytest.fixture(scope="module")
def mock() -> GeminiMock:
    return GeminiMock(api_key=KEY)


@pytest.fixture(scope="module")
def base_url(mock: GeminiMock) -> Iterator[str]:
    with serve_app(mock) as url:
        yield url


@pytest.fixture(autouse=True)
def fresh_mock(mock: GeminiMock) -> None:
    mock.reset()


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    async with UpstreamClient() as client:
        yield client


def gemini(
    base_url: str, client: UpstreamClient, model: str = "gemini-mock", **fields: Any
) -> GeminiAdapter:
    fields.setdefault("api_key", KEY)
    return GeminiAdapter(
        Upstream(provider="gemini", model=model, base_url=base_url, **fields), client
    )


def streamed_text(parsed: list[dict[str, Any]], choice: int = 0) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in parsed
        if c["choices"] and c["choices"][0]["index"] == choice
    )


def text(value: str) -> dict[str, str]:
    return {"text": value}


# --- request translation --------------------------------------------------------------------


async def test_request_is_translated_to_geminis_format(base_url, client, mock):
    call = chat_call(
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "developer", "content": [{"type": "text", "text": "answer in French"}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": PNG}},
                    {"type": "image_url", "image_url": {"url": "https://x.test/a.webp?s=1"}},
                    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                    {
                        "type": "file",
                        "file": {
                            "file_data": "data:application/pdf;base64,JVBERi0=",
                            "filename": "a.pdf",
                        },
                    },
                ],
            },
        ],
        max_tokens=50,
        temperature=1.5,
        top_p=0.9,
        stop="END",
        seed=7,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        # Fields Gemini has no place for are dropped, not sent to be refused.
        user="user-42",
        parallel_tool_calls=False,
        service_tier="flex",
        logprobs=True,
    )
    await gemini(base_url, client).chat(call)
    received = mock.script.received[-1]
    assert received.path == "/v1beta/models/gemini-mock:generateContent"
    assert last_sent(mock) == {
        "contents": [
            {
                "role": "user",
                "parts": [
                    text("what is this?"),
                    {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
                    {
                        "fileData": {
                            "mimeType": "image/webp",
                            "fileUri": "https://x.test/a.webp?s=1",
                        }
                    },
                    {"inlineData": {"mimeType": "audio/wav", "data": "UklGRg=="}},
                    {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0="}},
                ],
            }
        ],
        "systemInstruction": {"parts": [text("be brief"), text("answer in French")]},
        "generationConfig": {
            "stopSequences": ["END"],
            "maxOutputTokens": 50,
            "temperature": 1.5,
            "topP": 0.9,
            "seed": 7,
            "presencePenalty": 0.5,
            "frequencyPenalty": 0.25,
        },
    }


async def test_headers_path_and_api_version(base_url, client, mock):
    await gemini(base_url, client).chat(chat_call())
    received = mock.script.received[-1]
    assert received.headers["x-goog-api-key"] == KEY
    assert received.headers["content-type"] == "application/json"
    assert "authorization" not in received.headers
    assert "key=" not in received.path  # never in the URL, where logs would keep it
    await gemini(base_url, client, api_version="v1").chat(chat_call())
    assert mock.script.received[-1].path == "/v1/models/gemini-mock:generateContent"
    # A base URL given with its version reaches the same path.
    await gemini(base_url + "/v1beta/", client).chat(chat_call())
    assert mock.script.received[-1].path == "/v1beta/models/gemini-mock:generateContent"
    # A tuned model's full name is used as it is.
    with pytest.raises(UpstreamError):
        await gemini(base_url, client, model="tunedModels/mine").chat(chat_call())
    assert mock.script.received[-1].path == "/v1beta/tunedModels/mine:generateContent"


async def test_output_cap_is_always_sent_and_bounded_by_the_deployment(base_url, client, mock):
    adapter = gemini(base_url, client, max_output_tokens=16)
    await adapter.chat(chat_call())
    assert last_sent(mock)["generationConfig"]["maxOutputTokens"] == 16
    await adapter.chat(chat_call(max_completion_tokens=100))
    assert last_sent(mock)["generationConfig"]["maxOutputTokens"] == 16
    await adapter.chat(chat_call(max_tokens=3))
    assert last_sent(mock)["generationConfig"]["maxOutputTokens"] == 3


async def test_tools_are_declared_in_geminis_shape(base_url, client, mock):
    await gemini(base_url, client).chat(chat_call(tools=[WEATHER_TOOL, CLOCK_TOOL]))
    sent = last_sent(mock)
    assert sent["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "The weather in a city",
                    "parametersJsonSchema": WEATHER_SCHEMA,
                },
                {"name": "get_time"},
            ]
        }
    ]
    assert "toolConfig" not in sent


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"tool_choice": "auto"}, {"mode": "AUTO"}),
        ({"tool_choice": "required"}, {"mode": "ANY"}),
        ({"tool_choice": "none"}, {"mode": "NONE"}),
        (
            {"tool_choice": {"type": "function", "function": {"name": "get_time"}}},
            {"mode": "ANY", "allowedFunctionNames": ["get_time"]},
        ),
    ],
)
async def test_tool_choice(base_url, client, mock, fields, expected):
    await gemini(base_url, client).chat(chat_call(tools=[WEATHER_TOOL, CLOCK_TOOL], **fields))
    sent = last_sent(mock)
    assert sent["toolConfig"] == {"functionCallingConfig": expected}
    # `none` still declares the tools, so that earlier calls in the history make sense.
    assert len(sent["tools"][0]["functionDeclarations"]) == 2


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        ({"type": "text"}, {}),
        ({"type": "json_object"}, {"responseMimeType": "application/json"}),
        (
            {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER_SCHEMA}},
            {"responseMimeType": "application/json", "responseJsonSchema": WEATHER_SCHEMA},
        ),
    ],
)
async def test_json_output(base_url, client, mock, response_format, expected):
    result = await gemini(base_url, client).chat(chat_call(response_format=response_format))
    config = last_sent(mock)["generationConfig"]
    assert {k: v for k, v in config.items() if k.startswith("response")} == expected
    content = msgspec.json.decode(body_of(result))["choices"][0]["message"]["content"]
    if expected:
        assert msgspec.json.decode(content) == {"said": "hi there"}


async def test_tool_round_trip_with_signatures(base_url, client, mock):
    adapter = gemini(base_url, client)
    first = await adapter.chat(chat_call(tools=[WEATHER_TOOL, CLOCK_TOOL]))
    calls = msgspec.json.decode(body_of(first))["choices"][0]["message"]["tool_calls"]
    # The first call carries Gemini's thought signature in its id; the second has none.
    assert signature_of(calls[0]["id"]) == SIGNATURE
    assert signature_of(calls[1]["id"]) is None
    call = chat_call(
        tools=[WEATHER_TOOL, CLOCK_TOOL],
        messages=[
            {"role": "user", "content": "weather and time in Paris?"},
            {"role": "assistant", "content": "Let me check.", "tool_calls": calls},
            {"role": "tool", "tool_call_id": calls[0]["id"], "content": '{"degrees": 18}'},
            {
                "role": "tool",
                "tool_call_id": calls[1]["id"],
                "content": [{"type": "text", "text": "noon"}],
            },
            {"role": "user", "content": "and so?"},
        ],
    )
    result = await adapter.chat(call)
    assert last_sent(mock)["contents"] == [
        {"role": "user", "parts": [text("weather and time in Paris?")]},
        {
            "role": "model",
            "parts": [
                text("Let me check."),
                {
                    "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                    "thoughtSignature": SIGNATURE,
                },
                {"functionCall": {"name": "get_time", "args": {}}},
            ],
        },
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"degrees": 18}}},
                {"functionResponse": {"name": "get_time", "response": {"output": "noon"}}},
                text("and so?"),
            ],
        },
    ]
    answer = msgspec.json.decode(body_of(result))["choices"][0]
    assert answer["message"]["content"] == 'mock says: {"degrees":18} noon and so?'
    assert answer["finish_reason"] == "stop"


async def test_a_call_whose_signature_was_lost_is_refused_by_gemini(base_url, client, mock):
    # What the signature in the id is for: Gemini 3 refuses a model turn's calls without it.
    call = chat_call(
        tools=[CLOCK_TOOL],
        messages=[
            {"role": "user", "content": "time?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": ""},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "noon"},
        ],
    )
    with pytest.raises(UpstreamError) as caught:
        await gemini(base_url, client).chat(call)
    assert caught.value.status == 400 and "thought_signature" in caught.value.message


def test_signatures_survive_the_id_round_trip():
    signature = base64.b64encode(bytes(range(256))).decode()
    call_id = call_id_with_signature("call_req_0", signature)
    assert call_id.startswith("call_req_0__ts__")
    # Only characters every client keeps as they are.
    assert all(c.isalnum() or c in "_-" for c in call_id)
    assert signature_of(call_id) == signature
    assert call_id_with_signature("call_x", None) == "call_x"
    assert call_id_with_signature("call_x", "not base64!") == "call_x"
    assert signature_of("call_x") is None and signature_of(None) is None
    assert signature_of("call_x__ts__!!!") is None


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
    await gemini(base_url, client).chat(call)
    sent = last_sent(mock)
    assert sent["contents"] == [
        {"role": "user", "parts": [text("first"), text("second"), text("third")]}
    ]
    assert sent["systemInstruction"] == {"parts": [text("late system words")]}


@pytest.mark.parametrize(
    ("messages", "complaint"),
    [
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "ftp://x/a.png"}}],
                }
            ],
            "http(s) or gs:// URL or a data: URL",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "https://x.test/img"}}],
                }
            ],
            "name tells the file's type",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "data:image/png"}}],
                }
            ],
            "malformed",
        ),
        (
            [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AA"}}]}],
            "format",
        ),
        (
            [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}],
            "inline",
        ),
        ([{"role": "user", "content": [{"type": "video", "text": "x"}]}], "'video'"),
        (
            [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": PNG}}]}],
            "system instruction can hold text only",
        ),
        (
            [
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "[1]"},
                        }
                    ],
                }
            ],
            "JSON object",
        ),
        (
            [
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"arguments": "{}"}}
                    ],
                }
            ],
            "function name",
        ),
        ([{"role": "tool", "tool_call_id": "nowhere", "content": "18 degrees"}], "tool_call_id"),
        (
            [
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}],
                },
                {
                    "role": "tool",
                    "tool_call_id": "c",
                    "content": [{"type": "image_url", "image_url": {"url": PNG}}],
                },
            ],
            "tool result can hold text only",
        ),
        ([{"role": "system", "content": "only a system prompt"}], "at least one user"),
    ],
)
async def test_what_gemini_cannot_take_is_refused_before_sending(
    base_url, client, mock, messages, complaint
):
    call = chat_call(messages=messages)
    with pytest.raises(UpstreamError) as caught:
        await gemini(base_url, client).chat(call)
    assert (caught.value.status, caught.value.type) == (400, "invalid_request_error")
    assert not caught.value.retryable
    assert complaint in caught.value.message
    assert mock.script.received == []


# --- plain answers ----------------------------------------------------------------------------


async def test_plain_answer(base_url, client):
    result = await gemini(base_url, client).chat(chat_call())
    body = msgspec.json.decode(body_of(result))
    assert (body["id"], body["object"], body["model"]) == (
        "req-1",
        "chat.completion",
        "gemini-mock",
    )
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "mock says: hi there"},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ]
    # The mock counts a content's words plus 3, and one token per word of the answer.
    assert result.usage == Usage(5, 4, 9)
    assert not result.usage_estimated


async def test_thoughts_and_cached_tokens_in_usage(base_url, client, mock):
    mock.thoughts, mock.cached = 30, 100
    result = await gemini(base_url, client).chat(chat_call())
    # The thought summary is not part of the answer; its tokens are output all the same.
    assert msgspec.json.decode(body_of(result))["choices"][0]["message"]["content"] == (
        "mock says: hi there"
    )
    # Cached tokens are inside Gemini's prompt count already: counted once.
    assert result.usage == Usage(105, 34, 139)
    stream = await gemini(base_url, client).open_stream(chat_call(stream=True))
    events, error = await collect(stream)
    assert error is None and streamed_text(chunks(events)) == "mock says: hi there"
    assert stream.usage == Usage(105, 34, 139)


async def test_max_tokens_finish_is_length(base_url, client):
    result = await gemini(base_url, client).chat(chat_call(max_tokens=2))
    choice = msgspec.json.decode(body_of(result))["choices"][0]
    assert choice["message"]["content"] == "mock says:"
    assert choice["finish_reason"] == "length"
    assert result.usage.completion_tokens == 2


async def test_stop_sequence_finish_is_stop(base_url, client, mock):
    result = await gemini(base_url, client).chat(chat_call(stop=["there"]))
    choice = msgspec.json.decode(body_of(result))["choices"][0]
    assert last_sent(mock)["generationConfig"]["stopSequences"] == ["there"]
    assert (choice["message"]["content"], choice["finish_reason"]) == ("mock says: hi", "stop")


async def test_tool_call_answer(base_url, client):
    result = await gemini(base_url, client).chat(chat_call(tools=[WEATHER_TOOL, CLOCK_TOOL]))
    choice = msgspec.json.decode(body_of(result))["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."
    calls = choice["message"]["tool_calls"]
    assert [(c["type"], c["function"]) for c in calls] == [
        ("function", {"name": "get_weather", "arguments": '{"city":"Paris"}'}),
        ("function", {"name": "get_time", "arguments": "{}"}),
    ]
    assert calls[1]["id"] == "call_req-1_1"
    assert result.usage.completion_tokens == 3 + 20


async def test_forced_tool_call_has_null_content(base_url, client):
    named = {"type": "function", "function": {"name": "get_time"}}
    result = await gemini(base_url, client).chat(
        chat_call(tools=[WEATHER_TOOL, CLOCK_TOOL], tool_choice=named)
    )
    message = msgspec.json.decode(body_of(result))["choices"][0]["message"]
    assert message.get("content") is None
    assert [call["function"]["name"] for call in message["tool_calls"]] == ["get_time"]


async def test_several_candidates_are_choices(base_url, client, mock):
    result = await gemini(base_url, client).chat(chat_call(n=2))
    assert last_sent(mock)["generationConfig"]["candidateCount"] == 2
    choices = msgspec.json.decode(body_of(result))["choices"]
    assert [(c["index"], c["message"]["content"]) for c in choices] == [
        (0, "mock says: hi there"),
        (1, "[1] mock says: hi there"),
    ]
    stream = await gemini(base_url, client).open_stream(chat_call(n=2, stream=True))
    events, error = await collect(stream)
    assert error is None
    parsed = chunks(events)
    assert streamed_text(parsed, 0) == "mock says: hi there"
    assert streamed_text(parsed, 1) == "[1] mock says: hi there"
    finishes = [(c["choices"][0]["index"], c["choices"][0]["finish_reason"]) for c in parsed]
    assert [f for f in finishes if f[1]] == [(0, "stop"), (1, "stop")]


# --- safety -----------------------------------------------------------------------------------


async def test_a_blocked_prompt_is_the_clients_400_and_never_retried(base_url, client, mock):
    adapter = gemini(base_url, client)
    blocked = chat_call(messages=[{"role": "user", "content": "BLOCKME please"}])
    with pytest.raises(UpstreamError) as caught:
        await adapter.chat(blocked)
    error = caught.value
    assert (error.status, error.type, error.code) == (
        400,
        "invalid_request_error",
        "content_policy_violation",
    )
    assert not error.retryable
    assert "SAFETY" in error.message and "HARM_CATEGORY_DANGEROUS_CONTENT: HIGH" in error.message
    # Streamed, the refusal comes before any event, so nothing reached the client.
    stream = await adapter.open_stream(chat_call(stream=True, messages=blocked.request.messages))
    with pytest.raises(UpstreamError) as caught:
        await anext(aiter(stream))
    assert (caught.value.status, caught.value.code) == (400, "content_policy_violation")
    await stream.aclose()


async def test_an_answer_stopped_for_safety_is_content_filter(base_url, client):
    call = chat_call(messages=[{"role": "user", "content": "UNSAFE things"}])
    result = await gemini(base_url, client).chat(call)
    choice = msgspec.json.decode(body_of(result))["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == (
        "mock says:",
        "content_filter",
    )
    stream = await gemini(base_url, client).open_stream(
        chat_call(stream=True, messages=call.request.messages)
    )
    events, error = await collect(stream)
    assert error is None
    assert chunks(events)[-1]["choices"][0]["finish_reason"] == "content_filter"


# --- streams ----------------------------------------------------------------------------------


async def test_stream_of_text(base_url, client, mock):
    stream = await gemini(base_url, client).open_stream(chat_call(stream=True))
    events, error = await collect(stream)
    assert error is None
    assert mock.script.received[-1].path == "/v1beta/models/gemini-mock:streamGenerateContent"
    parsed = chunks(events)
    assert {(c["id"], c["model"]) for c in parsed} == {("req-1", "gemini-mock")}
    assert parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert streamed_text(parsed) == "mock says: hi there"
    assert len(parsed) == 1 + 4 + 1  # role, one chunk per word, finish
    assert parsed[-1]["choices"] == [
        {"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}
    ]
    assert all("usage" not in c for c in parsed)
    assert stream.usage == Usage(5, 4, 9) and not stream.usage_estimated


async def test_stream_sends_usage_only_when_asked(base_url, client):
    call = chat_call(stream=True, stream_options={"include_usage": True})
    stream = await gemini(base_url, client).open_stream(call)
    events, error = await collect(stream)
    assert error is None
    parsed = chunks(events)
    assert parsed[-1]["choices"] == []
    assert parsed[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    assert parsed[-2]["choices"][0]["finish_reason"] == "stop"


async def test_stream_of_tool_calls_split_across_events(base_url, client, mock):
    call = chat_call(stream=True, tools=[WEATHER_TOOL, CLOCK_TOOL])
    stream = await gemini(base_url, client).open_stream(call)
    events, error = await collect(stream)
    assert error is None
    parsed = chunks(events)
    deltas = [c["choices"][0]["delta"] for c in parsed]
    assert streamed_text(parsed) == "Let me check."
    # Each call came in its own event: each is its own chunk, numbered across them.
    with_calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert [[(c["index"], c["function"]["name"]) for c in calls] for calls in with_calls] == [
        [(0, "get_weather")],
        [(1, "get_time")],
    ]
    assert with_calls[0][0]["function"]["arguments"] == '{"city":"Paris"}'
    assert with_calls[1][0]["function"]["arguments"] == "{}"
    assert signature_of(with_calls[0][0]["id"]) == SIGNATURE
    assert parsed[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert stream.usage is not None and stream.usage.completion_tokens == 23


async def test_stream_length_finish(base_url, client):
    stream = await gemini(base_url, client).open_stream(chat_call(stream=True, max_tokens=3))
    events, error = await collect(stream)
    assert error is None
    parsed = chunks(events)
    assert streamed_text(parsed) == "mock says: hi"
    assert parsed[-1]["choices"][0]["finish_reason"] == "length"


async def test_error_event_mid_stream(base_url, client, mock):
    mock.fail_stream_next("UNAVAILABLE", "The model is overloaded.", after=2)
    stream = await gemini(base_url, client).open_stream(chat_call(stream=True))
    events, error = await collect(stream)
    assert error is not None
    assert (error.status, error.code, error.retryable) == (502, "unavailable", True)
    assert "overloaded" in error.message
    assert streamed_text(chunks(events)) == "mock says:"
    # Gemini's prompt count is kept; the output is estimated from what arrived.
    assert stream.usage == Usage(5, estimate_text_tokens("mock says:"), 8)
    assert stream.usage_estimated


async def test_quota_error_event_is_a_429(base_url, client, mock):
    mock.fail_stream_next("RESOURCE_EXHAUSTED", "Quota exceeded.", after=1)
    stream = await gemini(base_url, client).open_stream(chat_call(stream=True))
    _, error = await collect(stream)
    assert error is not None
    assert (error.status, error.code, error.retryable) == (429, "rate_limit_exceeded", True)


async def test_error_before_any_content_comes_before_any_event(base_url, client, mock):
    mock.fail_stream_next("INTERNAL", "An internal error has occurred.", after=0)
    stream = await gemini(base_url, client).open_stream(chat_call(stream=True))
    with pytest.raises(UpstreamError) as caught:
        await anext(aiter(stream))
    # Nothing reached the client yet, so the router may still try another deployment.
    assert caught.value.retryable and caught.value.status == 502
    await stream.aclose()


async def test_stream_cut_before_its_finish_is_an_error(base_url, client, mock):
    # Every word arrived, but not the event with the finish reason.
    mock.script.cut_stream_after = 4
    stream = await gemini(base_url, client).open_stream(chat_call(stream=True))
    events, error = await collect(stream)
    assert error is not None and "ended early" in error.message
    assert error.status == 502 and error.retryable
    parsed = chunks(events)
    assert streamed_text(parsed) == "mock says: hi there"
    assert all(c["choices"][0]["finish_reason"] is None for c in parsed)
    # Gemini's running count (4) is no final one: what arrived is counted by estimate, if
    # that is more, and the whole is marked estimated.
    written = estimate_text_tokens("mock says: hi there")
    assert written > 4
    assert stream.usage == Usage(5, written, 5 + written) and stream.usage_estimated


async def test_usage_is_estimated_when_a_stream_dies_at_once(base_url, client, mock):
    mock.script.cut_stream_after = 0
    call = chat_call(stream=True)
    stream = await gemini(base_url, client).open_stream(call)
    events, error = await collect(stream)
    assert events == [] and error is not None
    prompt = estimate_prompt_tokens(call.request.messages)
    assert stream.usage == Usage(prompt, 0, prompt) and stream.usage_estimated


async def test_aclose_hangs_up_on_gemini(base_url, client, mock):
    mock.script.chunk_delay = 0.2
    stream = await gemini(base_url, client).open_stream(chat_call(stream=True))
    await anext(aiter(stream))
    await stream.aclose()
    for _ in range(100):
        if mock.script.cancelled:
            break
        await asyncio.sleep(0.02)
    assert mock.script.cancelled == 1


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "status", "type_", "code", "retryable", "wait", "words"),
    [
        (
            INVALID_ARGUMENT,
            400,
            "invalid_request_error",
            "bad_request",
            False,
            None,
            "invalid argument",
        ),
        (TOO_LONG, 400, "invalid_request_error", "context_length_exceeded", False, None, "exceeds"),
        # Google answers a bad key 400, but no client can mend it: the deployment's fault.
        (
            API_KEY_INVALID,
            502,
            "upstream_error",
            "api_key_invalid",
            False,
            None,
            "API key not valid",
        ),
        (
            FAILED_PRECONDITION,
            502,
            "upstream_error",
            "failed_precondition",
            False,
            None,
            "location",
        ),
        (PERMISSION_DENIED, 502, "upstream_error", "permission_denied", False, None, "permission"),
        (NOT_FOUND, 404, "invalid_request_error", "model_not_found", False, None, "gemini-nope"),
        # RetryInfo's retryDelay is honoured as a Retry-After would be.
        (RESOURCE_EXHAUSTED, 429, "upstream_error", "rate_limit_exceeded", True, 7.0, "quota"),
        (INTERNAL, 502, "upstream_error", "internal", True, None, "internal error"),
        (UNAVAILABLE, 502, "upstream_error", "unavailable", True, None, "overloaded"),
        (DEADLINE_EXCEEDED, 504, "upstream_error", "deadline_exceeded", True, None, "Deadline"),
    ],
)
async def test_error_answers(
    base_url, client, mock, failure, status, type_, code, retryable, wait, words
):
    adapter = gemini(base_url, client)
    mock.script.fail_next(failure, times=2)
    for attempt in (adapter.chat(chat_call()), adapter.open_stream(chat_call(stream=True))):
        with pytest.raises(UpstreamError) as caught:
            await attempt
        error = caught.value
        assert (error.status, error.type, error.code) == (status, type_, code)
        assert error.retryable is retryable
        assert error.upstream_status == failure.status
        assert error.retry_after == wait
        assert words in error.message


async def test_retry_after_header_and_hostile_retry_delays(base_url, client, mock):
    adapter = gemini(base_url, client)
    quota = msgspec.json.decode(RESOURCE_EXHAUSTED.body)
    for delay, expected in [
        ("1e400s", None),
        ("-5s", None),
        ("nan", None),
        ("99999999s", 3600.0),
        ("2.5s", 2.5),
    ]:
        quota["error"]["details"][1]["retryDelay"] = delay
        mock.script.fail_next(Failure(429, msgspec.json.encode(quota)))
        with pytest.raises(UpstreamError) as caught:
            await adapter.chat(chat_call())
        assert caught.value.retry_after == expected, delay
    # Without RetryInfo, a Retry-After header is used.
    mock.script.fail_next(
        Failure(
            429, b'{"error": {"code": 429, "status": "RESOURCE_EXHAUSTED"}}', {"retry-after": "3"}
        )
    )
    with pytest.raises(UpstreamError) as caught:
        await adapter.chat(chat_call())
    assert caught.value.retry_after == 3.0


async def test_real_refusals_of_the_mock(base_url, client):
    with pytest.raises(UpstreamError) as caught:
        await gemini(base_url, client, model="gemini-nope").chat(chat_call())
    assert (caught.value.status, caught.value.code) == (404, "model_not_found")
    with pytest.raises(UpstreamError) as caught:
        await gemini(base_url, client, api_key="wrong").chat(chat_call())
    assert (caught.value.status, caught.value.code, caught.value.retryable) == (
        502,
        "api_key_invalid",
        False,
    )
    with pytest.raises(UpstreamError) as caught:
        await gemini(base_url, client, api_key=None).chat(chat_call())
    assert (caught.value.status, caught.value.code) == (502, "permission_denied")


@pytest.mark.parametrize(
    "body",
    [
        b"<html>Bad Gateway</html>",
        b'{"error": "a string"}',
        b'{"error": {"code": "x", "details": 5}}',
        b"[" * 100_000,
    ],
)
async def test_an_error_body_that_is_not_googles(base_url, client, mock, body):
    mock.script.fail_next(Failure(502, body))
    with pytest.raises(UpstreamError) as caught:
        await gemini(base_url, client).chat(chat_call())
    assert (caught.value.status, caught.value.code, caught.value.retryable) == (502, None, True)


@pytest.mark.parametrize(
    "answer",
    [
        b"not json",
        b'{"candidates": "no"}',
        b'{"candidates": [{"content": {"parts": [{"text": 5}]}}]}',
        b"[" * 100_000,
    ],
)
async def test_an_answer_that_is_not_geminis_is_a_retryable_502(base_url, client, mock, answer):
    mock.script.fail_next(Failure(200, answer))
    with pytest.raises(UpstreamError) as caught:
        await gemini(base_url, client).chat(chat_call())
    assert caught.value.status == 502 and caught.value.retryable


async def test_hostile_counts_and_no_candidates(base_url, client, mock):
    hostile = {
        "candidates": [{"content": {"parts": [{"text": "ok"}]}, "finishReason": "STOP"}],
        "usageMetadata": {"promptTokenCount": -4, "candidatesTokenCount": 1e400},
    }
    mock.script.fail_next(Failure(200, msgspec.json.encode(hostile).replace(b"inf", b"1e400")))
    result = await gemini(base_url, client).chat(chat_call())
    assert result.usage_estimated
    assert result.usage.completion_tokens == estimate_text_tokens("ok")
    mock.script.fail_next(Failure(200, b'{"candidates": []}'))
    with pytest.raises(UpstreamError) as caught:
        await gemini(base_url, client).chat(chat_call())
    assert caught.value.status == 502 and caught.value.retryable


async def test_slow_gemini_times_out(base_url, client, mock):
    mock.script.delay = 2
    with pytest.raises(UpstreamError) as caught:
        await gemini(base_url, client, read_timeout=0.2).chat(chat_call())
    assert (caught.value.status, caught.value.retryable, caught.value.type) == (
        504,
        True,
        "timeout",
    )


async def test_what_gemini_does_not_serve(base_url, client):
    adapter = gemini(base_url, client)
    for attempt in (adapter.complete(None), adapter.images(None)):  # type: ignore[arg-type]
        with pytest.raises(UpstreamError) as caught:
            await attempt
        assert caught.value.code == "model_not_supported"


# --- embeddings -------------------------------------------------------------------------------


async def test_one_input_is_embed_content(base_url, client, mock):
    adapter = gemini(base_url, client, model="gemini-embed-mock")
    result = await adapter.embed(embed_call(input="hello world", dimensions=4))
    assert mock.script.received[-1].path == "/v1beta/models/gemini-embed-mock:embedContent"
    assert last_sent(mock) == {
        "content": {"parts": [text("hello world")]},
        "outputDimensionality": 4,
    }
    body = msgspec.json.decode(body_of(result))
    assert [len(item["embedding"]) for item in body["data"]] == [4]
    # Gemini counts no tokens for embeddings: estimated.
    assert result.usage_estimated and result.usage.prompt_tokens == estimate_text_tokens(
        "hello world"
    )


async def test_many_inputs_are_batched(base_url, client, mock):
    adapter = gemini(base_url, client, model="gemini-embed-mock")
    texts = [f"text {n}" for n in range(150)]
    result = await adapter.embed(embed_call(input=texts, encoding_format="base64"))
    paths = [r.path for r in mock.script.received]
    assert paths == ["/v1beta/models/gemini-embed-mock:batchEmbedContents"] * 2
    first = msgspec.json.decode(mock.script.received[0].body)["requests"]
    assert len(first) == 100 and first[0] == {
        "content": {"parts": [text("text 0")]},
        "model": "models/gemini-embed-mock",
    }
    data = msgspec.json.decode(body_of(result))["data"]
    assert [item["index"] for item in data] == list(range(150))
    assert len(base64.b64decode(data[0]["embedding"])) == 8 * 4


async def test_an_embedding_count_that_does_not_match_is_a_502(base_url, client, mock):
    mock.script.fail_next(Failure(200, b'{"embeddings": [{"values": [1.0]}]}'))
    with pytest.raises(UpstreamError) as caught:
        await gemini(base_url, client).embed(embed_call(input=["a", "b"]))
    assert caught.value.status == 502 and "1 embeddings for 2 inputs" in caught.value.message


# --- the mock itself --------------------------------------------------------------------------


async def test_mock_is_as_strict_as_gemini(base_url):
    async with httpx.AsyncClient() as http:  # a plain client, to check the mock itself
        url = base_url + "/v1beta/models/gemini-mock:generateContent"
        headers = {"x-goog-api-key": KEY}
        hello = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
        assert (await http.post(url, json=hello, headers=headers)).status_code == 200
        for bad in (
            {"contents": []},
            {**hello, "temperature": 1},
            {"contents": [{"role": "assistant", "parts": [{"text": "hi"}]}]},
            {"contents": [{"role": "user", "parts": [{}]}]},
            {
                "contents": [
                    {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {}}}]}
                ]
            },
        ):
            response = await http.post(url, json=bad, headers=headers)
            assert response.status_code == 400, bad
            assert response.json()["error"]["status"] == "INVALID_ARGUMENT"
        stream_url = base_url + "/v1beta/models/gemini-mock:streamGenerateContent"
        assert (await http.post(stream_url, json=hello, headers=headers)).status_code == 400
        assert (await http.post(url, json=hello)).status_code == 403


# --- through real nodes -----------------------------------------------------------------------

DEPLOYMENT = """
[[models]]
name = "gemini"
provider = "gemini"
model = "gemini-mock"
base_url = "{url}"
api_key_env = "GEMINI_MOCK_KEY"
max_output_tokens = 1024
price_in = 1_250_000
price_out = 10_000_000
"""


@pytest.fixture
def gemini_node(node_dir: NodeDir, base_url, monkeypatch) -> NodeDir:
    monkeypatch.setenv("GEMINI_MOCK_KEY", KEY)
    node_dir.add_config(DEPLOYMENT.format(url=base_url))
    return node_dir


def test_chat_through_a_node_with_the_openai_sdk(gemini_node, mock):
    hello = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello there"}]
    with run_node(gemini_node) as node:
        sdk = openai.OpenAI(base_url=node.url + "/v1", api_key=node.key, max_retries=0)
        raw = sdk.chat.completions.with_raw_response.create(model="gemini", messages=hello)
        reply = raw.parse()
        assert reply.choices[0].message.content == "mock says: hello there"
        # The mock counts the system prompt's words too: 2 + (2 + 3).
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (7, 4)
        # 7 tokens at $1.25/1M in and 4 at $10/1M out: 48.75, rounded up.
        assert raw.headers["aihub-cost-micros"] == "49"
        sent = last_sent(mock)
        assert sent["systemInstruction"] == {"parts": [text("be kind")]}
        assert sent["generationConfig"]["maxOutputTokens"] == 1024

        stream = sdk.chat.completions.create(
            model="gemini", messages=hello, stream=True, stream_options={"include_usage": True}
        )
        pieces = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == (
            "mock says: hello there"
        )
        assert pieces[-1].usage is not None and pieces[-1].usage.completion_tokens == 4

        tools = [WEATHER_TOOL]
        question = [{"role": "user", "content": "weather in Paris?"}]
        called = sdk.chat.completions.create(model="gemini", messages=question, tools=tools)
        assert called.choices[0].finish_reason == "tool_calls"
        tool_call = called.choices[0].message.tool_calls[0]
        assert (tool_call.function.name, tool_call.function.arguments) == (
            "get_weather",
            '{"city":"Paris"}',
        )
        # The SDK sends the call back as it got it; its signature goes back to Gemini.
        follow_up = [
            *question,
            called.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": tool_call.id, "content": "18 degrees"},
        ]
        final = sdk.chat.completions.create(model="gemini", messages=follow_up, tools=tools)
        assert final.choices[0].message.content == "mock says: 18 degrees"
        assert last_sent(mock)["contents"][1]["parts"][1]["thoughtSignature"] == SIGNATURE

        streamed = sdk.chat.completions.create(
            model="gemini", messages=question, tools=tools, stream=True
        )
        calls = [
            c
            for chunk in streamed
            if chunk.choices
            for c in chunk.choices[0].delta.tool_calls or ()
        ]
        assert [(c.index, c.function.name) for c in calls] == [(0, "get_weather")]

        blocked = [{"role": "user", "content": "BLOCKME"}]
        with pytest.raises(openai.BadRequestError) as caught:
            sdk.chat.completions.create(model="gemini", messages=blocked)
        assert caught.value.code == "content_policy_violation"


def test_messages_and_responses_surfaces(gemini_node, mock):
    with run_node(gemini_node) as node:
        claude = anthropic.Anthropic(base_url=node.url, api_key=node.key, max_retries=0)
        message = claude.messages.create(
            model="gemini", max_tokens=100, messages=[{"role": "user", "content": "hello there"}]
        )
        assert message.content[0].text == "mock says: hello there"
        assert message.stop_reason == "end_turn"
        assert (message.usage.input_tokens, message.usage.output_tokens) == (5, 4)
        with claude.messages.stream(
            model="gemini",
            max_tokens=100,
            messages=[{"role": "user", "content": "weather?"}],
            tools=[{"name": "get_weather", "input_schema": WEATHER_SCHEMA}],
        ) as stream:
            final = stream.get_final_message()
        assert final.stop_reason == "tool_use"
        use = next(block for block in final.content if block.type == "tool_use")
        assert (use.name, use.input) == ("get_weather", {"city": "Paris"})

        sdk = openai.OpenAI(base_url=node.url + "/v1", api_key=node.key, max_retries=0)
        response = sdk.responses.create(model="gemini", input="hello there")
        assert response.output_text == "mock says: hello there"
        events = list(sdk.responses.create(model="gemini", input="a b", stream=True))
        assert events[-1].type == "response.completed"
        assert events[-1].response.output_text == "mock says: a b"


def test_a_gemini_deployment_served_across_a_peer(tmp_path, base_url, monkeypatch):
    monkeypatch.setenv("GEMINI_MOCK_KEY", KEY)
    server = make_peer(tmp_path, "server", DEPLOYMENT.format(url=base_url))
    consumer = make_peer(tmp_path, "consumer")
    with server.run(), consumer.run() as node:
        cli("join", invite(server), "--data-dir", str(consumer.path))
        assert wait_for(lambda: model_owners(node).get("gemini") == "server")
        sdk = openai.OpenAI(base_url=node.url + "/v1", api_key=node.key, max_retries=0)
        reply = sdk.chat.completions.create(
            model="gemini", messages=[{"role": "user", "content": "hi there"}]
        )
        assert reply.choices[0].message.content == "mock says: hi there"
        stream = sdk.chat.completions.create(
            model="gemini", messages=[{"role": "user", "content": "hi there"}], stream=True
        )
        assert (
            "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            == "mock says: hi there"
        )


# --- properties: translation both ways --------------------------------------------------------

words = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
names = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
json_objects = st.dictionaries(
    names, st.one_of(st.integers(-5, 5), words, st.booleans(), st.none()), max_size=3
)


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, Any]]:
    """OpenAI conversations: system words anywhere, user turns of text or parts, assistant
    turns with text and calls, and results answering calls made before them."""
    messages: list[dict[str, Any]] = []
    open_calls: list[str] = []
    for turn in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["system", "user", "user_parts", "assistant", "tool"]))
        if kind == "system":
            messages.append({"role": "system", "content": draw(words)})
        elif kind == "user":
            messages.append({"role": "user", "content": draw(words)})
        elif kind == "user_parts":
            parts = [
                {"type": "text", "text": t} for t in draw(st.lists(words, min_size=1, max_size=3))
            ]
            messages.append({"role": "user", "content": parts})
        elif kind == "assistant":
            calls = [
                {
                    "id": f"call_{turn}_{n}",
                    "type": "function",
                    "function": {
                        "name": draw(names),
                        "arguments": msgspec.json.encode(args).decode(),
                    },
                }
                for n, args in enumerate(draw(st.lists(json_objects, max_size=3)))
            ]
            message: dict[str, Any] = {"role": "assistant", "content": draw(st.none() | words)}
            if calls:
                message["tool_calls"] = calls
                open_calls += [call["id"] for call in calls]
            messages.append(message)
        elif open_calls:
            content = draw(words | json_objects.map(lambda o: msgspec.json.encode(o).decode()))
            messages.append({"role": "tool", "tool_call_id": open_calls.pop(0), "content": content})
    # The user has the last word (and so there is always one that says something).
    messages.append({"role": "user", "content": draw(words)})
    return messages


def _texts_of(message: dict[str, Any]) -> list[str]:
    content = message.get("content")
    if isinstance(content, str):
        return [content] if content else []
    return [part["text"] for part in content or () if part["text"]]


@settings(max_examples=150, deadline=None)
@given(conversations())
def test_any_conversation_becomes_a_request_gemini_accepts(messages):
    call = chat_call(messages=messages)
    upstream = Upstream(provider="gemini", model="gemini-mock")
    body = chat_body(call, upstream)
    # As strict as Google reads it (unknown fields, empty parts, roles).
    request = msgspec.json.decode(body, type=MockRequest)
    contents = request.contents
    assert all(a.role != b.role for a, b in itertools.pairwise(contents))
    # Every text, in order, in its role; the system's beside the conversation.
    system = [t for m in messages if m["role"] == "system" for t in _texts_of(m)]
    sent_system = (
        [p.text for p in request.system_instruction.parts] if request.system_instruction else []
    )
    assert sent_system == system
    spoken = [t for m in messages if m["role"] in ("user", "assistant") for t in _texts_of(m)]
    assert [p.text for c in contents for p in c.parts if p.text is not None] == spoken
    # Calls keep their arguments; each result names the function of the call it answers.
    calls = {c["id"]: c["function"] for m in messages for c in m.get("tool_calls", ())}
    sent_calls = [p.function_call for c in contents for p in c.parts if p.function_call]
    assert [(f.name, f.args) for f in sent_calls] == [
        (f["name"], msgspec.json.decode(f["arguments"])) for f in calls.values()
    ]
    results = [p.function_response for c in contents for p in c.parts if p.function_response]
    answered = [m for m in messages if m["role"] == "tool"]
    assert [r.name for r in results] == [calls[m["tool_call_id"]]["name"] for m in answered]
    for result, message in zip(results, answered, strict=True):
        try:
            expected = msgspec.json.decode(message["content"], type=dict[str, Any])
        except msgspec.DecodeError:
            expected = {"output": message["content"]}
        assert result.response == expected


FINISHES = [
    "STOP",
    "MAX_TOKENS",
    "SAFETY",
    "RECITATION",
    "OTHER",
    "MALFORMED_FUNCTION_CALL",
    "NEW_ONE",
]
EXPECTED_FINISH = {
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
}


@st.composite
def answers(draw: st.DrawFn) -> dict[str, Any]:
    """Gemini answers: parts of text, thoughts and function calls, a finish reason, counts."""
    parts: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["text", "thought", "call"]))
        if kind == "text":
            parts.append({"text": draw(words)})
        elif kind == "thought":
            parts.append({"text": draw(words), "thought": True})
        else:
            call: dict[str, Any] = {
                "functionCall": {"name": draw(names), "args": draw(json_objects)}
            }
            if draw(st.booleans()):
                call["thoughtSignature"] = base64.b64encode(
                    draw(st.binary(min_size=1, max_size=40))
                ).decode()
            parts.append(call)
    usage = {
        key: draw(st.integers(0, 10_000))
        for key in (
            "promptTokenCount",
            "candidatesTokenCount",
            "thoughtsTokenCount",
            "toolUsePromptTokenCount",
        )
        if draw(st.booleans())
    }
    candidate: dict[str, Any] = {"finishReason": draw(st.sampled_from(FINISHES))}
    if parts:
        candidate["content"] = {"role": "model", "parts": parts}
    return {"candidates": [candidate], "usageMetadata": usage}


def _expected_reply(answer: dict[str, Any]) -> tuple[str, list[tuple[str, Any, str | None]], str]:
    candidate = answer["candidates"][0]
    parts = candidate.get("content", {}).get("parts", [])
    text_ = "".join(p["text"] for p in parts if "text" in p and not p.get("thought"))
    calls = [
        (p["functionCall"]["name"], p["functionCall"]["args"], p.get("thoughtSignature"))
        for p in parts
        if "functionCall" in p
    ]
    reason = EXPECTED_FINISH.get(candidate["finishReason"], "tool_calls" if calls else "stop")
    return text_, calls, reason


class _Body:
    """An upstream's streamed body, cut into the given pieces."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece

    async def aclose(self) -> None:
        pass


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if a < b]


@settings(max_examples=150, deadline=None)
@given(answers(), st.lists(st.integers(0, 4000), max_size=8), st.randoms(use_true_random=False))
async def test_any_answer_whole_or_streamed_reads_the_same(answer, cuts, random):
    upstream = Upstream(provider="gemini", model="gemini-mock")
    text_, calls, reason = _expected_reply(answer)
    usage = answer["usageMetadata"]
    prompt = usage.get("promptTokenCount")
    expected_prompt = None if prompt is None else prompt + usage.get("toolUsePromptTokenCount", 0)
    expected_output = usage.get("candidatesTokenCount", 0) + usage.get("thoughtsTokenCount", 0)

    call = chat_call()
    whole = completion_of(
        call,
        upstream,
        msgspec.json.decode(msgspec.json.encode(answer), type=GenerateContentResponse),
    )
    message = whole.chat_completion().choices[0].message
    assert message.content == (text_ or (None if calls else ""))
    got = [
        (c.function.name, msgspec.json.decode(c.function.arguments), signature_of(c.id))
        for c in message.tool_calls or ()
    ]
    assert got == calls
    assert whole.chat_completion().choices[0].finish_reason == reason
    if expected_prompt is not None:
        assert whole.usage == Usage(
            expected_prompt, expected_output, expected_prompt + expected_output
        )
        assert not whole.usage_estimated
    else:
        assert whole.usage_estimated

    # The same answer streamed: its parts spread over events, the events over random reads.
    candidate = answer["candidates"][0]
    parts = candidate.get("content", {}).get("parts", [])
    events = []
    for part in parts:
        events.append({"candidates": [{"content": {"role": "model", "parts": [part]}}]})
    events.append(
        {"candidates": [{"finishReason": candidate["finishReason"]}], "usageMetadata": usage}
    )
    sse = b"".join(
        b"data: " + msgspec.json.encode(e) + random.choice([b"\n\n", b"\r\n\r\n"]) for e in events
    )
    stream = GeminiStream(chat_call(stream=True), upstream, _Body(_cut(sse, cuts)))  # type: ignore[arg-type]
    streamed = [event async for event in stream]
    streamed_text_ = "".join(e.text for e in streamed if isinstance(e, TextDelta))
    fragments = [f for e in streamed if isinstance(e, ToolCallDelta) for f in e.calls]
    assert streamed_text_ == text_
    assert [
        (f.name, msgspec.json.decode(f.arguments or ""), signature_of(f.id)) for f in fragments
    ] == calls
    assert [f.index for f in fragments] == list(range(len(calls)))
    assert [e.reason for e in streamed if isinstance(e, Finish)] == [reason]
    assert stream.usage == whole.usage


def test_the_routers_rules_hold_for_geminis_errors(gemini_node, mock):
    gemini_node.set_router("retries = 2\nbackoff_base = 0.01\nbackoff_max = 0.05")
    # A second deployment of the same name, tried after Gemini.
    gemini_node.add_config('[[models]]\nname = "gemini"\nprovider = "echo"\npriority = 1')
    hi = [{"role": "user", "content": "hi there"}]
    with run_node(gemini_node) as node:
        sdk = openai.OpenAI(base_url=node.url + "/v1", api_key=node.key, max_retries=0)
        # Quota: retried on the same deployment after the wait Google's RetryInfo asks.
        quota = msgspec.json.decode(RESOURCE_EXHAUSTED.body)
        quota["error"]["details"][1]["retryDelay"] = "0.05s"
        mock.script.fail_next(Failure(429, msgspec.json.encode(quota)))
        reply = sdk.chat.completions.create(model="gemini", messages=hi)
        assert reply.choices[0].message.content == "mock says: hi there"
        assert len(mock.script.received) == 2
        # A safety block: the client's 400 at once, neither retried nor sent elsewhere.
        with pytest.raises(openai.BadRequestError) as caught:
            sdk.chat.completions.create(
                model="gemini", messages=[{"role": "user", "content": "BLOCKME"}]
            )
        assert caught.value.code == "content_policy_violation"
        assert len(mock.script.received) == 3
        # The deployment's own trouble (region, billing): not retried, the next one serves.
        mock.script.fail_next(FAILED_PRECONDITION)
        reply = sdk.chat.completions.create(model="gemini", messages=hi)
        assert reply.choices[0].message.content == "echo: hi there"
        assert len(mock.script.received) == 4


async def test_candidates_and_arguments_past_what_was_asked_are_ignored(base_url, client, mock):
    hostile = {
        "candidates": [
            {"index": 7, "content": {"parts": [{"text": "stray"}]}, "finishReason": "STOP"},
            {"index": -1, "content": {"parts": [{"text": "negative"}]}, "finishReason": "STOP"},
            {
                "content": {
                    "parts": [{"text": "mine"}, {"functionCall": {"name": "f", "args": [1]}}]
                },
                "finishReason": "STOP",
            },
            {"content": {"parts": [{"text": "again"}]}, "finishReason": "STOP"},
        ]
    }
    answer = msgspec.json.encode(hostile)
    mock.script.fail_next(Failure(200, answer))
    result = await gemini(base_url, client).chat(chat_call())
    choices = msgspec.json.decode(body_of(result))["choices"]
    assert [c["message"]["content"] for c in choices] == ["mine"]
    assert choices[0]["message"]["tool_calls"][0]["function"]["arguments"] == "{}"
    mock.script.fail_next(Failure(200, b"data: " + answer + b"\n\n"))
    stream = await gemini(base_url, client).open_stream(chat_call(stream=True))
    events, error = await collect(stream)
    assert error is None
    assert {c["choices"][0]["index"] for c in chunks(events)} == {0}
    assert streamed_text(chunks(events)) == "mine"


def test_a_stream_cut_short_through_a_node(gemini_node, mock):
    mock.script.cut_stream_after = 2  # two words, then the connection closes
    with run_node(gemini_node) as node:
        sdk = openai.OpenAI(base_url=node.url + "/v1", api_key=node.key, max_retries=0)
        stream = sdk.chat.completions.create(
            model="gemini", messages=[{"role": "user", "content": "hi there"}], stream=True
        )
        pieces: list[str] = []
        with pytest.raises(openai.APIError) as caught:
            for chunk in stream:
                pieces += [chunk.choices[0].delta.content or ""] if chunk.choices else []
        assert "ended early" in caught.value.message
        assert "".join(pieces) == "mock says:"
    # What arrived was charged, by estimate, and the record says the stream failed.
    assert wait_for(lambda: any(r.model == "gemini" for r in usage_rows(gemini_node.path)))
    (row,) = [r for r in usage_rows(gemini_node.path) if r.model == "gemini"]
    assert row.stream and row.estimated and row.tokens_out > 0 and row.cost_micros > 0
    assert row.provider == "gemini" and row.status == 502


def test_what_gemini_cannot_take_is_refused_in_each_surfaces_shape(gemini_node, mock):
    ftp = {"type": "image_url", "image_url": {"url": "ftp://x.test/a.png"}}
    with run_node(gemini_node) as node:
        sdk = openai.OpenAI(base_url=node.url + "/v1", api_key=node.key, max_retries=0)
        with pytest.raises(openai.BadRequestError) as caught:
            sdk.chat.completions.create(
                model="gemini", messages=[{"role": "user", "content": [ftp]}]
            )
        assert "data: URL" in caught.value.message
        orphan = [
            {"role": "user", "content": "hi"},
            {"role": "tool", "tool_call_id": "call_nowhere", "content": "18"},
        ]
        with pytest.raises(openai.BadRequestError) as caught:
            sdk.chat.completions.create(model="gemini", messages=orphan, stream=True)
        assert "tool_call_id" in caught.value.message
        claude = anthropic.Anthropic(base_url=node.url, api_key=node.key, max_retries=0)
        with pytest.raises(anthropic.BadRequestError) as refused:
            claude.messages.create(
                model="gemini",
                max_tokens=10,
                messages=[{"role": "user", "content": "BLOCKME"}],
            )
        assert refused.value.body["type"] == "error"
        assert "blocked the prompt" in refused.value.body["error"]["message"]
    # None of them cost Gemini a call but the blocked prompt, which Gemini itself refused.
    assert len(mock.script.received) == 1
