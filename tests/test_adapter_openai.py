"""The OpenAI-compatible and Azure adapters against a mock that speaks OpenAI's wire format."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import msgspec
import pytest

from adapters.http import ATTEMPT_DEADLINE, UpstreamClient
from adapters.openai import AzureOpenAIAdapter, OpenAIAdapter
from adapters.types import (
    EmbedCall,
    EmbeddingRequest,
    Upstream,
    UpstreamError,
)
from tests.calls import body_of, chat_call, rendered
from tests.mocks.openai_mock import RATE_LIMITED, SERVER_ERROR, OpenAIMock
from tests.mocks.script import Failure
from tests.mocks.server import serve_app


@pytest.fixture(scope="module")
def mock() -> OpenAIMock:
    return OpenAIMock(api_key="sk-mock")


@pytest.fixture(scope="module")
def base_url(mock: OpenAIMock) -> Iterator[str]:
    with serve_app(mock) as url:
        yield url


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    async with UpstreamClient() as client:
        yield client


def openai(base_url: str, client: UpstreamClient, key: str = "sk-mock") -> OpenAIAdapter:
    upstream = Upstream(provider="openai", model="gpt-x", base_url=base_url + "/v1", api_key=key)
    return OpenAIAdapter(upstream, client)


async def test_chat_passes_unknown_fields_and_replaces_model(base_url, client, mock):
    result = await openai(base_url, client).chat(chat_call(service_tier="flex", temperature=0.5))
    sent = msgspec.json.decode(mock.script.received[-1].body)
    assert sent["model"] == "gpt-x"
    assert sent["service_tier"] == "flex"
    assert sent["temperature"] == 0.5
    body = msgspec.json.decode(body_of(result))
    assert body["choices"][0]["message"]["content"] == "mock says: hi there"
    assert body["system_fingerprint"] == "fp_mock"
    assert result.usage.completion_tokens == 4
    assert not result.usage_estimated


async def test_stream_forces_usage_but_hides_it_unless_asked(base_url, client, mock):
    stream = await openai(base_url, client).open_stream(chat_call(stream=True))
    events = await rendered(stream)
    sent = msgspec.json.decode(mock.script.received[-1].body)
    assert sent["stream_options"] == {"include_usage": True}
    assert all(b'"usage"' not in event for event in events)
    assert stream.usage is not None and stream.usage.completion_tokens == 4
    text = "".join(
        msgspec.json.decode(e[6:])["choices"][0]["delta"].get("content") or "" for e in events
    )
    assert text == "mock says: hi there"


async def test_stream_passes_usage_when_asked(base_url, client):
    call = chat_call(stream=True, stream_options={"include_usage": True})
    stream = await openai(base_url, client).open_stream(call)
    events = await rendered(stream)
    assert b'"usage"' in events[-1]


async def test_errors_are_translated(base_url, client, mock):
    adapter = openai(base_url, client)
    mock.script.fail_next(Failure(RATE_LIMITED.status, RATE_LIMITED.body, {"retry-after": "3"}))
    with pytest.raises(UpstreamError) as caught:
        await adapter.chat(chat_call())
    assert (caught.value.status, caught.value.retryable, caught.value.retry_after) == (429, True, 3)
    assert "Rate limit reached" in caught.value.message
    mock.script.fail_next(SERVER_ERROR)
    with pytest.raises(UpstreamError) as caught:
        await adapter.open_stream(chat_call(stream=True))
    assert (caught.value.status, caught.value.retryable) == (502, True)


async def test_bad_provider_key_is_not_the_clients_fault(base_url, client):
    with pytest.raises(UpstreamError) as caught:
        await openai(base_url, client, key="wrong").chat(chat_call())
    assert caught.value.status == 502
    assert caught.value.upstream_status == 401


async def test_unreachable_upstream_is_retryable(client):
    from tests.mocks.server import free_port

    adapter = openai(f"http://127.0.0.1:{free_port()}", client)
    with pytest.raises(UpstreamError) as caught:
        await adapter.chat(chat_call())
    assert caught.value.retryable and caught.value.status == 502


async def test_embeddings_base64(base_url, client):
    body = msgspec.json.encode({"model": "e", "input": ["a b", "c"], "encoding_format": "base64"})
    call = EmbedCall(
        msgspec.json.decode(body, type=EmbeddingRequest),
        msgspec.json.decode(body, type=dict[str, msgspec.Raw]),
        "req-2",
    )
    result = await openai(base_url, client).embed(call)
    data = msgspec.json.decode(body_of(result))["data"]
    assert len(data) == 2 and isinstance(data[0]["embedding"], str)
    assert result.usage.prompt_tokens == 3


async def test_azure_uses_deployment_url_and_api_key(base_url, client, mock):
    upstream = Upstream(
        provider="azure",
        model="my-deploy",
        base_url=base_url,
        api_key="sk-mock",
        api_version="2024-10-21",
    )
    result = await AzureOpenAIAdapter(upstream, client).chat(chat_call())
    received = mock.script.received[-1]
    assert received.path == "/openai/deployments/my-deploy/chat/completions"
    assert received.headers["api-key"] == "sk-mock"
    assert "authorization" not in received.headers
    assert result.usage.total_tokens > 0


@pytest.mark.parametrize(
    ("attempt", "read", "code"), [(600.0, 0.2, None), (0.3, 600.0, "deadline_exceeded")]
)
async def test_the_read_timeout_and_the_attempt_deadline_whichever_is_first(
    base_url, client, mock, attempt, read, code
):
    """Within an attempt's deadline (as the router sets it), a provider silent for longer than
    the deployment's read timeout is cut at the read timeout, and one within it at the
    deadline (the provider would answer after 5 s): the read timer is left unarmed only
    where the deadline always comes first."""
    upstream = Upstream(
        provider="openai",
        model="gpt-x",
        base_url=base_url + "/v1",
        api_key="sk-mock",
        read_timeout=read,
    )
    mock.script.delay = 5.0
    loop = asyncio.get_running_loop()
    token = ATTEMPT_DEADLINE.set(loop.time() + attempt)
    try:
        with pytest.raises(UpstreamError) as caught:
            await OpenAIAdapter(upstream, client).chat(chat_call())
    finally:
        ATTEMPT_DEADLINE.reset(token)
        mock.script.delay = 0.0
    assert (caught.value.status, caught.value.type, caught.value.code) == (504, "timeout", code)


@pytest.mark.parametrize("base", ["http://[::1/v1", "ftp://127.0.0.1/v1", "http:///v1"])
async def test_a_url_that_is_no_http_url_is_an_unreachable_upstream(client, base):
    """A base URL that does not parse, or names no HTTP host (a peer's comes from its
    advert), is the upstream failing, a retryable 502, not the node's own error."""
    upstream = Upstream(provider="openai", model="gpt-x", base_url=base, api_key="sk-mock")
    with pytest.raises(UpstreamError) as caught:
        await OpenAIAdapter(upstream, client).chat(chat_call())
    assert (caught.value.status, caught.value.type, caught.value.retryable) == (
        502,
        "upstream_unreachable",
        True,
    )


async def test_a_complete_call_cancelled_hangs_up_on_the_provider(base_url, client, mock):
    """A client gone before a complete (non-streamed) answer cancels the call: the provider
    sees its connection close (it would go on generating, and billing, otherwise). aiohttp
    does; pyreqwest 0.15 did not (bench/README.md): whatever client complete answers take."""
    before, seen = mock.script.cancelled, len(mock.script.received)
    mock.script.delay = 60.0
    try:
        call = asyncio.ensure_future(openai(base_url, client).chat(chat_call()))
        for _ in range(500):
            if len(mock.script.received) > seen:
                break
            await asyncio.sleep(0.01)
        assert len(mock.script.received) > seen, "the request never reached the provider"
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        for _ in range(500):
            if mock.script.cancelled > before:
                break
            await asyncio.sleep(0.01)
        assert mock.script.cancelled == before + 1
    finally:
        mock.script.delay = 0.0
