"""Numbers from upstreams and peers are untrusted: a token count that is negative, huge
(2^62), not an integer, missing or more than the request could have used never fails an
answer, never reaches the database, a metric or the journal as it is (it is clamped, and the
record says so), and the charge never passes what was reserved. Journal replay skips and
reports a record it cannot apply: the node still starts."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from msgspec import Raw

from adapters.anthropic import AnthropicAdapter
from adapters.http import UpstreamClient
from adapters.ollama import OllamaAdapter
from adapters.openai import OpenAIAdapter
from adapters.tokens import MAX_TOKEN_COUNT, token_count
from adapters.types import Upstream, Usage
from node.config import DATABASE_FILE
from node.journal import JOURNAL_DIR, Journal, left_behind, replay
from node.storage import Hold, Settlement, Store
from node.usage import PROMPT_FACTOR, PROMPT_SLACK, clamp_usage
from tests.calls import chat_call, embed_call
from tests.conftest import NodeDir, concurrent_client
from tests.mocks.script import read_body
from tests.mocks.server import free_port, serve_app
from tests.test_budgets import make_key, spend_of
from tests.test_journal import _serve
from tests.test_storage import settlement as usage_of

SETTINGS = settings(max_examples=300, deadline=None, database=None)

# Counts as an upstream might write them, as JSON text: none may fail an answer.
BAD = ["-5", "1.5", "12.0", '"12"', "true", "null", "{}", "[1]", "1e400", str(2**62), str(2**70)]


def _good(text: str) -> int | None:
    """The count a JSON text is taken for, if it is one (a non-negative integer)."""
    try:
        value = msgspec.json.decode(text.encode(), type=int)
    except msgspec.DecodeError:
        return None
    return min(value, MAX_TOKEN_COUNT) if value >= 0 else None


# --- the pure parts: reading a count, clamping usage ---------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)


@SETTINGS
@given(value=json_values)
@example(value=2**62)
@example(value=-1)
@example(value=True)
def test_a_count_is_a_non_negative_int_within_bounds_or_none(value: Any) -> None:
    count = token_count(Raw(msgspec.json.encode(value)))
    if type(value) is int and value >= 0:
        assert count == min(value, MAX_TOKEN_COUNT)
    else:
        assert count is None


counts = (
    st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=4)
    | st.booleans()
    | st.none()
)


@SETTINGS
@given(
    prompt=counts,
    completion=counts,
    total=counts,
    worst_prompt=st.integers(0, 10**7),
    worst_completion=st.integers(0, 10**6),
)
@example(prompt=2**62, completion=2**62, total=-1, worst_prompt=10, worst_completion=5)
def test_clamped_usage_is_within_what_the_request_could_use(
    prompt: Any, completion: Any, total: Any, worst_prompt: int, worst_completion: int
) -> None:
    worst = Usage(worst_prompt, worst_completion, worst_prompt + worst_completion)
    usage, clamped = clamp_usage(Usage(prompt, completion, total), worst)
    most_prompt = worst_prompt * PROMPT_FACTOR + PROMPT_SLACK
    assert type(usage.prompt_tokens) is int and 0 <= usage.prompt_tokens <= most_prompt
    assert type(usage.completion_tokens) is int and 0 <= usage.completion_tokens <= worst_completion
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    honest = (
        type(prompt) is int
        and type(completion) is int
        and 0 <= prompt <= most_prompt
        and 0 <= completion <= worst_completion
    )
    # Counts that were possible pass as they are; any other is clamped, and said to be.
    assert clamped is not honest
    if honest:
        assert (usage.prompt_tokens, usage.completion_tokens) == (prompt, completion)


# --- every adapter reads whatever an upstream writes in its counts -------------------------


class Canned:
    """An upstream that answers every request with one canned body."""

    def __init__(self) -> None:
        self.body = b""
        self.content_type = "application/json"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await read_body(receive)
        headers = [(b"content-type", self.content_type.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


@pytest.fixture(scope="module")
def canned() -> Iterator[tuple[Canned, str]]:
    app = Canned()
    with serve_app(app) as url:
        yield app, url


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    async with UpstreamClient() as client:
        yield client


def _sse(*events: str, named: bool = False) -> bytes:
    out = []
    for event in events:
        kind = event.split('"type":"', 1)[1].split('"', 1)[0] if named else None
        out.append((f"event: {kind}\n" if kind else "") + f"data: {event}\n\n")
    return "".join(out).encode()


def _openai_chat(v: str) -> bytes:
    return (
        '{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":'
        '"assistant","content":"hello there"},"finish_reason":"stop"}],'
        f'"usage":{{"prompt_tokens":{v},"completion_tokens":{v},"total_tokens":{v}}}}}'
    ).encode()


def _openai_stream(v: str) -> bytes:
    chunk = '{{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":{}}}'
    return _sse(
        chunk.format('[{"index":0,"delta":{"content":"hello there"}}]'),
        chunk.format('[{"index":0,"delta":{},"finish_reason":"stop"}]'),
        chunk.format("[]")[:-1]
        + f',"usage":{{"prompt_tokens":{v},"completion_tokens":{v},"total_tokens":-3}}}}',
    ) + b"data: [DONE]\n\n"


def _anthropic_chat(v: str) -> bytes:
    return (
        '{"id":"m","type":"message","role":"assistant","content":[{"type":"text","text":'
        f'"hello there"}}],"stop_reason":"end_turn","usage":{{"input_tokens":{v},'
        f'"output_tokens":{v},"cache_read_input_tokens":{v}}}}}'
    ).encode()


def _anthropic_stream(v: str) -> bytes:
    return _sse(
        '{"type":"message_start","message":{"id":"m","content":[],'
        f'"usage":{{"input_tokens":{v},"output_tokens":{v}}}}}}}',
        '{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}',
        '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hello"}}',
        '{"type":"content_block_stop","index":0}',
        '{"type":"message_delta","delta":{"stop_reason":"end_turn"},'
        f'"usage":{{"output_tokens":{v}}}}}',
        '{"type":"message_stop"}',
        named=True,
    )


def _ollama_chat(v: str) -> bytes:
    return (
        '{"message":{"role":"assistant","content":"hello there"},"done":true,'
        f'"done_reason":"stop","prompt_eval_count":{v},"eval_count":{v}}}'
    ).encode()


def _ollama_stream(v: str) -> bytes:
    return (
        b'{"message":{"role":"assistant","content":"hello"},"done":false}\n'
        + _ollama_chat(v).replace(b'"hello there"', b'""')
        + b"\n"
    )


def _adapter(provider: str, url: str, client: UpstreamClient) -> Any:
    upstream = Upstream(provider=provider, model="m", base_url=url)  # type: ignore[arg-type]
    kind = {"openai": OpenAIAdapter, "anthropic": AnthropicAdapter, "ollama": OllamaAdapter}
    return kind[provider](upstream, client)


def _assert_sane(usage: Usage, estimated: bool, text: str, *, embedding: bool = False) -> None:
    for count in (usage.prompt_tokens, usage.completion_tokens):
        assert type(count) is int and 0 <= count <= 2 * MAX_TOKEN_COUNT
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    good = _good(text)
    if good is None:
        assert estimated
    else:
        assert usage.prompt_tokens >= good
        if not embedding:
            assert usage.completion_tokens == good


CHATS = {
    "openai": (_openai_chat, _openai_stream, "text/event-stream"),
    "anthropic": (_anthropic_chat, _anthropic_stream, "text/event-stream"),
    "ollama": (_ollama_chat, _ollama_stream, "application/x-ndjson"),
}


@pytest.mark.parametrize("provider", sorted(CHATS))
@pytest.mark.parametrize("text", [*BAD, "7"])
async def test_any_count_in_an_answer_is_read_or_estimated(canned, client, provider, text):
    app, url = canned
    plain, streamed, media = CHATS[provider]
    adapter = _adapter(provider, url, client)
    app.body, app.content_type = plain(text), "application/json"
    result = await adapter.chat(chat_call())
    _assert_sane(result.usage, result.usage_estimated, text)
    app.body, app.content_type = streamed(text), media
    stream = await adapter.open_stream(chat_call(stream=True))
    try:
        events = [event async for event in stream]
    finally:
        await stream.aclose()
    assert events
    assert stream.usage is not None
    _assert_sane(stream.usage, stream.usage_estimated, text)


@pytest.mark.parametrize("text", [*BAD, "7"])
async def test_any_count_in_embeddings_is_read_or_estimated(canned, client, text):
    app, url = canned
    app.content_type = "application/json"
    app.body = (
        '{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.5]}],'
        f'"model":"m","usage":{{"prompt_tokens":{text},"total_tokens":{text}}}}}'
    ).encode()
    result = await _adapter("openai", url, client).embed(embed_call(input="hi"))
    _assert_sane(result.usage, result.usage_estimated, text, embedding=True)
    app.body = f'{{"embeddings":[[0.5]],"prompt_eval_count":{text}}}'.encode()
    result = await _adapter("ollama", url, client).embed(embed_call(input="hi"))
    _assert_sane(result.usage, result.usage_estimated, text, embedding=True)
