"""The Ollama adapter against a mock that speaks Ollama's native wire format."""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import msgspec
import pytest

from adapters.http import UpstreamClient
from adapters.ollama import OllamaAdapter
from adapters.tokens import estimate_prompt_tokens, estimate_text_tokens
from adapters.types import (
    Upstream,
    UpstreamError,
    Usage,
)
from tests.calls import body_of, chat_call, chunks, collect, embed_call, last_sent
from tests.mocks.ollama_mock import OVERLOADED, SERVER_ERROR, OllamaMock, mock_vector
from tests.mocks.server import serve_app

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


@pytest.fixture(scope="module")
def mock() -> OllamaMock:
    return OllamaMock(models=("llama3", "nomic-embed-text"))


@pytest.fixture(scope="module")
def base_url(mock: OllamaMock) -> Iterator[str]:
    with serve_app(mock) as url:
        yield url


@pytest.fixture(autouse=True)
def fresh_mock(mock: OllamaMock) -> None:
    mock.reset()


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    async with UpstreamClient() as client:
        yield client


def ollama(
    base_url: str, client: UpstreamClient, model: str = "llama3", **fields: Any
) -> OllamaAdapter:
    return OllamaAdapter(
        Upstream(provider="ollama", model=model, base_url=base_url, **fields), client
    )


def streamed_text(parsed: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in parsed if c["choices"])


# --- request translation --------------------------------------------------------------------


async def test_request_is_translated_to_ollamas_format(base_url, client, mock):
    svg = "data:image/svg+xml,%3Csvg%2F%3E"  # a data: URL that is not base64
    call = chat_call(
        messages=[
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
                    },
                    {"type": "image_url", "image_url": {"url": svg}},
                ],
            },
        ],
        max_tokens=50,
        temperature=0.2,
        top_p=0.9,
        seed=7,
        stop="END",
        presence_penalty=0.5,
        response_format={"type": "json_object"},
        service_tier="flex",
    )
    await ollama(base_url, client).chat(call)
    assert mock.script.received[-1].path == "/api/chat"
    assert last_sent(mock) == {
        "model": "llama3",
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": "what is this?",
                "images": ["iVBORw0KGgo=", base64.b64encode(b"<svg/>").decode()],
            },
        ],
        "stream": False,
        "options": {
            "num_predict": 50,
            "temperature": 0.2,
            "top_p": 0.9,
            "seed": 7,
            "stop": ["END"],
            "presence_penalty": 0.5,
        },
        "format": "json",
    }


async def test_json_schema_becomes_the_format(base_url, client, mock):
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    await ollama(base_url, client).chat(chat_call(response_format=response_format))
    assert last_sent(mock)["format"] == schema


async def test_output_limit_is_capped_by_the_deployment(base_url, client, mock):
    adapter = ollama(base_url, client, max_output_tokens=16)
    await adapter.chat(chat_call())
    assert last_sent(mock)["options"] == {"num_predict": 16}
    await adapter.chat(chat_call(max_completion_tokens=100))
    assert last_sent(mock)["options"] == {"num_predict": 16}
    await adapter.chat(chat_call(max_completion_tokens=3))
    assert last_sent(mock)["options"] == {"num_predict": 3}


async def test_tools_are_offered_in_ollamas_shape(base_url, client, mock):
    await ollama(base_url, client).chat(chat_call(tools=[WEATHER_TOOL, CLOCK_TOOL]))
    assert last_sent(mock)["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        },
        {"type": "function", "function": {"name": "get_time"}},
    ]


async def test_tool_choice_none_and_named(base_url, client, mock):
    adapter = ollama(base_url, client)
    result = await adapter.chat(chat_call(tools=[WEATHER_TOOL], tool_choice="none"))
    assert "tools" not in last_sent(mock)
    assert msgspec.json.decode(body_of(result))["choices"][0]["finish_reason"] == "stop"
    named = {"type": "function", "function": {"name": "get_time"}}
    await adapter.chat(chat_call(tools=[WEATHER_TOOL, CLOCK_TOOL], tool_choice=named))
    assert [tool["function"]["name"] for tool in last_sent(mock)["tools"]] == ["get_time"]


async def test_tool_round_trip(base_url, client, mock):
    call = chat_call(
        tools=[WEATHER_TOOL],
        messages=[
            {"role": "user", "content": "weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_abc",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_abc", "content": "18 degrees"},
        ],
    )
    result = await ollama(base_url, client).chat(call)
    messages = last_sent(mock)["messages"]
    assert messages[1] == {
        "role": "assistant",
        "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}, "id": "call_abc"}
        ],
    }
    assert messages[2] == {
        "role": "tool",
        "content": "18 degrees",
        "tool_name": "get_weather",
        "tool_call_id": "call_abc",
    }
    answer = msgspec.json.decode(body_of(result))["choices"][0]
    assert answer["message"]["content"] == "mock says: 18 degrees"
    assert answer["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("message", "complaint"),
    [
        (
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}],
            },
            "data: URLs",
        ),
        (
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AA"}}]},
            "input_audio",
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
    ],
)
async def test_what_ollama_cannot_take_is_refused_before_sending(
    base_url, client, mock, message, complaint
):
    call = chat_call(messages=[message, {"role": "user", "content": "go"}])
    with pytest.raises(UpstreamError) as caught:
        await ollama(base_url, client).chat(call)
    assert (caught.value.status, caught.value.type) == (400, "invalid_request_error")
    assert not caught.value.retryable
    assert complaint in caught.value.message
    assert mock.script.received == []


async def test_api_key_is_sent_as_a_bearer_token(base_url, client, mock):
    await ollama(base_url, client, api_key="sk-proxy").chat(chat_call())
    assert mock.script.received[-1].headers["authorization"] == "Bearer sk-proxy"
    await ollama(base_url, client).chat(chat_call())
    assert "authorization" not in mock.script.received[-1].headers


# --- plain answers ----------------------------------------------------------------------------


async def test_plain_answer(base_url, client):
    result = await ollama(base_url, client).chat(chat_call())
    body = msgspec.json.decode(body_of(result))
    assert body["id"] == "req-1"
    assert body["object"] == "chat.completion"
    assert body["model"] == "llama3"
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


async def test_length_finish(base_url, client):
    result = await ollama(base_url, client).chat(chat_call(max_tokens=2))
    choice = msgspec.json.decode(body_of(result))["choices"][0]
    assert choice["message"]["content"] == "mock says:"
    assert choice["finish_reason"] == "length"
    assert result.usage.completion_tokens == 2


async def test_tool_call_answer(base_url, client):
    result = await ollama(base_url, client).chat(chat_call(tools=[WEATHER_TOOL]))
    choice = msgspec.json.decode(body_of(result))["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"].get("content") is None
    assert choice["message"]["tool_calls"] == [
        {
            "type": "function",
            "id": "call_req-1_0",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        }
    ]
    assert result.usage.completion_tokens == 12


async def test_ollamas_own_tool_call_ids_are_kept(base_url, client, mock):
    mock.tool_call_ids = True
    result = await ollama(base_url, client).chat(chat_call(tools=[WEATHER_TOOL]))
    calls = msgspec.json.decode(body_of(result))["choices"][0]["message"]["tool_calls"]
    assert [call["id"] for call in calls] == ["call_mock0001"]


async def test_usage_is_estimated_when_ollama_omits_it(base_url, client, mock):
    mock.omit_counts = True
    call = chat_call()
    result = await ollama(base_url, client).chat(call)
    prompt = estimate_prompt_tokens(call.request.messages)
    completion = estimate_text_tokens("mock says: hi there")
    assert result.usage == Usage(prompt, completion, prompt + completion)
    assert result.usage_estimated


# --- streams ----------------------------------------------------------------------------------


async def test_stream_of_text(base_url, client, mock):
    stream = await ollama(base_url, client).open_stream(chat_call(stream=True))
    events, error = await collect(stream)
    assert error is None
    assert last_sent(mock)["stream"] is True
    parsed = chunks(events)
    assert all(c["object"] == "chat.completion.chunk" for c in parsed)
    assert {(c["id"], c["model"], c["created"]) for c in parsed} == {
        ("req-1", "llama3", parsed[0]["created"])
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
    stream = await ollama(base_url, client).open_stream(call)
    events, error = await collect(stream)
    assert error is None
    parsed = chunks(events)
    assert parsed[-1]["choices"] == []
    assert parsed[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    assert parsed[-2]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c for c in parsed[:-1])


async def test_stream_of_tool_calls(base_url, client):
    stream = await ollama(base_url, client).open_stream(
        chat_call(stream=True, tools=[WEATHER_TOOL])
    )
    events, error = await collect(stream)
    assert error is None
    parsed = chunks(events)
    deltas = [c["choices"][0]["delta"] for c in parsed]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert deltas[1] == {
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                "id": "call_req-1_0",
                "index": 0,
            }
        ]
    }
    assert parsed[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert stream.usage is not None and stream.usage.completion_tokens == 12


async def test_stream_length_finish(base_url, client):
    stream = await ollama(base_url, client).open_stream(chat_call(stream=True, max_tokens=3))
    events, error = await collect(stream)
    assert error is None
    parsed = chunks(events)
    assert streamed_text(parsed) == "mock says: hi"
    assert parsed[-1]["choices"][0]["finish_reason"] == "length"
    assert stream.usage is not None and stream.usage.completion_tokens == 3


async def test_stream_usage_is_estimated_when_ollama_omits_it(base_url, client, mock):
    mock.omit_counts = True
    call = chat_call(stream=True, stream_options={"include_usage": True})
    stream = await ollama(base_url, client).open_stream(call)
    events, error = await collect(stream)
    assert error is None
    prompt = estimate_prompt_tokens(call.request.messages)
    completion = estimate_text_tokens("mock says: hi there")
    assert stream.usage == Usage(prompt, completion, prompt + completion)
    assert stream.usage_estimated
    assert chunks(events)[-1]["usage"]["total_tokens"] == prompt + completion


async def test_error_mid_stream(base_url, client, mock):
    mock.fail_stream_next("llama runner process has terminated", after=2)
    stream = await ollama(base_url, client).open_stream(chat_call(stream=True))
    events, error = await collect(stream)
    assert error is not None
    assert error.status == 502
    assert "llama runner process has terminated" in error.message
    assert streamed_text(chunks(events)) == "mock says:"
    # The counts never came: what did arrive is estimated.
    assert stream.usage is not None and stream.usage_estimated


async def test_error_as_the_first_line_comes_before_any_event(base_url, client, mock):
    mock.fail_stream_next("model failed to load", after=0)
    stream = await ollama(base_url, client).open_stream(chat_call(stream=True))
    events = aiter(stream)
    with pytest.raises(UpstreamError) as caught:
        await anext(events)
    # Nothing reached the client yet, so the router may still try another deployment.
    assert caught.value.retryable
    assert "model failed to load" in caught.value.message
    await stream.aclose()


async def test_stream_cut_without_done_is_an_error(base_url, client, mock):
    mock.script.cut_stream_after = 2
    stream = await ollama(base_url, client).open_stream(chat_call(stream=True))
    events, error = await collect(stream)
    assert error is not None and "ended early" in error.message
    assert streamed_text(chunks(events)) == "mock says:"


async def test_aclose_hangs_up_on_ollama(base_url, client, mock):
    mock.script.chunk_delay = 0.2
    stream = await ollama(base_url, client).open_stream(chat_call(stream=True))
    events = aiter(stream)
    await anext(events)
    await stream.aclose()
    for _ in range(100):
        if mock.script.cancelled:
            break
        await asyncio.sleep(0.02)
    assert mock.script.cancelled == 1


# --- embeddings -------------------------------------------------------------------------------


async def test_embeddings_float(base_url, client, mock):
    adapter = ollama(base_url, client, model="nomic-embed-text")
    result = await adapter.embed(embed_call(input="the sky is blue", dimensions=4))
    received = mock.script.received[-1]
    assert received.path == "/api/embed"
    assert msgspec.json.decode(received.body) == {
        "model": "nomic-embed-text",
        "input": "the sky is blue",
        "dimensions": 4,
    }
    body = msgspec.json.decode(body_of(result))
    assert body["object"] == "list" and body["model"] == "nomic-embed-text"
    assert body["data"] == [
        {"object": "embedding", "index": 0, "embedding": mock_vector("the sky is blue", 0, 4)}
    ]
    assert body["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    assert result.usage == Usage(4, 0, 4)
    assert not result.usage_estimated


async def test_embeddings_base64(base_url, client, mock):
    adapter = ollama(base_url, client, model="nomic-embed-text")
    result = await adapter.embed(embed_call(input=["a b", "c"], encoding_format="base64"))
    assert last_sent(mock)["input"] == ["a b", "c"]
    data = msgspec.json.decode(body_of(result))["data"]
    assert [item["index"] for item in data] == [0, 1]
    for item, text in zip(data, ["a b", "c"], strict=True):
        vector = struct.unpack("<8f", base64.b64decode(item["embedding"]))
        assert vector == pytest.approx(mock_vector(text, item["index"], 8), rel=1e-6)
    assert result.usage.prompt_tokens == 3


async def test_embedding_usage_is_estimated_when_ollama_omits_it(base_url, client, mock):
    mock.omit_counts = True
    adapter = ollama(base_url, client, model="nomic-embed-text")
    result = await adapter.embed(embed_call(input=["a b", "c"]))
    tokens = estimate_text_tokens("a b") + estimate_text_tokens("c")
    assert result.usage == Usage(tokens, 0, tokens)
    assert result.usage_estimated


# --- errors -----------------------------------------------------------------------------------


async def test_unknown_model_is_a_404(base_url, client):
    adapter = ollama(base_url, client, model="nope")
    attempts = [
        adapter.chat(chat_call()),
        adapter.open_stream(chat_call(stream=True)),
        adapter.embed(embed_call(input="x")),
    ]
    for attempt in attempts:
        with pytest.raises(UpstreamError) as caught:
            await attempt
        error = caught.value
        assert (error.status, error.type, error.code) == (
            404,
            "invalid_request_error",
            "model_not_found",
        )
        assert not error.retryable
        assert 'model "nope" not found' in error.message


async def test_server_errors_are_retryable(base_url, client, mock):
    adapter = ollama(base_url, client)
    mock.script.fail_next(SERVER_ERROR)
    with pytest.raises(UpstreamError) as caught:
        await adapter.chat(chat_call())
    assert (caught.value.status, caught.value.retryable, caught.value.upstream_status) == (
        502,
        True,
        500,
    )
    assert "llama runner process has terminated" in caught.value.message
    assert caught.value.code is None
    mock.script.fail_next(OVERLOADED)
    with pytest.raises(UpstreamError) as caught:
        await adapter.open_stream(chat_call(stream=True))
    assert (caught.value.status, caught.value.retryable, caught.value.upstream_status) == (
        502,
        True,
        503,
    )


async def test_slow_ollama_times_out(base_url, client, mock):
    mock.script.delay = 2
    with pytest.raises(UpstreamError) as caught:
        await ollama(base_url, client, read_timeout=0.2).chat(chat_call())
    assert (caught.value.status, caught.value.retryable, caught.value.type) == (
        504,
        True,
        "timeout",
    )


# --- the mock itself --------------------------------------------------------------------------


async def test_mock_streams_unless_told_not_to_like_ollama(base_url):
    async with httpx.AsyncClient() as client:  # a plain client, to check the mock itself
        body = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
        response = await client.post(base_url + "/api/chat", json=body)
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = [msgspec.json.decode(line) for line in response.content.splitlines()]
        assert [line["done"] for line in lines] == [False, False, False, True]
        assert lines[-1]["done_reason"] == "stop" and lines[-1]["eval_count"] == 3
        tags = (await client.get(base_url + "/api/tags")).json()
        assert [model["name"] for model in tags["models"]] == [
            "llama3:latest",
            "nomic-embed-text:latest",
        ]
