"""OpenAI-compatible upstreams: OpenAI, OpenRouter, vLLM, LM Studio, llama.cpp, LocalAI, Groq…

The client's request is forwarded field for field (only `model` is replaced and, on streams,
`stream_options.include_usage` forced on so that usage is always counted), and the answer is
passed back byte for byte; the gateway only peeks at each chunk for usage and errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
from msgspec import Raw

from adapters.http import (
    UpstreamClient,
    UpstreamRequest,
    UpstreamResponse,
    build_request,
    iter_sse,
    join_url,
    openai_error_message,
    send,
)
from adapters.tokens import estimate_prompt_tokens, estimate_text_tokens
from adapters.types import (
    RECEIPT_EVENT,
    RECEIPT_HEADER,
    ChatCall,
    ChatResult,
    EmbedCall,
    EmbedResult,
    Upstream,
    UpstreamError,
    Usage,
    sse_event,
)

_INCLUDE_USAGE = Raw(b'{"include_usage":true}')
_TRUE = Raw(b"true")
_FALSE = Raw(b"false")


class _PeekUsage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class _PeekMessage(msgspec.Struct):
    content: str | None = None


class _PeekChoice(msgspec.Struct):
    message: _PeekMessage | None = None
    delta: _PeekMessage | None = None
    finish_reason: str | None = None


class _Peek(msgspec.Struct):
    """What the gateway reads of a response or chunk; everything else passes untouched."""

    choices: list[_PeekChoice] | None = None
    usage: _PeekUsage | None = None
    error: Raw | None = None


_peek = msgspec.json.Decoder(_Peek)


def _usage(peek: _PeekUsage) -> Usage:
    total = peek.total_tokens or peek.prompt_tokens + peek.completion_tokens
    return Usage(peek.prompt_tokens, peek.completion_tokens, total)


def _estimated_usage(call: ChatCall, completion_text: str) -> Usage:
    prompt = estimate_prompt_tokens(call.request.messages)
    completion = estimate_text_tokens(completion_text)
    return Usage(prompt, completion, prompt + completion)


class OpenAIAdapter:
    """Speaks OpenAI's `/chat/completions` and `/embeddings` at `base_url`."""

    def __init__(self, upstream: Upstream, client: UpstreamClient) -> None:
        self.upstream = upstream
        self.client = client

    def url(self, endpoint: str) -> str:
        return join_url(self.upstream.base_url or "https://api.openai.com/v1", endpoint)

    def auth_headers(self) -> dict[str, str]:
        key = self.upstream.api_key
        return {"authorization": f"Bearer {key}"} if key else {}

    def _body(self, raw: dict[str, Raw], **overrides: Raw) -> bytes:
        fields = dict(raw)
        fields["model"] = Raw(msgspec.json.encode(self.upstream.model))
        fields.update(overrides)
        return msgspec.json.encode(fields)

    def request_headers(self, url: str, body: bytes, request_id: str) -> dict[str, str]:
        """Headers for one call; a subclass may add to them (a peer signs the request)."""
        return self.auth_headers()

    def _request(self, endpoint: str, body: bytes, request_id: str) -> UpstreamRequest:
        url = self.url(endpoint)
        headers = self.request_headers(url, body, request_id)
        return build_request(self.upstream, url, body, headers)

    async def chat(self, call: ChatCall) -> ChatResult:
        body = self._body(call.raw, stream=_FALSE)
        request = self._request("chat/completions", body, call.request_id)
        response = await send(self.client, self.upstream, request)
        content = response.content
        try:
            peek = _peek.decode(content)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise UpstreamError(
                502, f"{self.upstream.provider} upstream sent invalid JSON: {exc}", retryable=True
            ) from exc
        receipt = _receipt_of(response)
        if peek.usage is not None:
            return ChatResult(content, _usage(peek.usage), receipt=receipt)
        text = "".join(
            (choice.message.content or "") for choice in peek.choices or () if choice.message
        )
        return ChatResult(
            content, _estimated_usage(call, text), usage_estimated=True, receipt=receipt
        )

    async def open_stream(self, call: ChatCall) -> OpenAIStream:
        body = self._body(call.raw, stream=_TRUE, stream_options=_INCLUDE_USAGE)
        request = self._request("chat/completions", body, call.request_id)
        response = await send(self.client, self.upstream, request, stream=True)
        return OpenAIStream(call, self.upstream, response)

    async def embed(self, call: EmbedCall) -> EmbedResult:
        body = self._body(call.raw)
        request = self._request("embeddings", body, call.request_id)
        response = await send(self.client, self.upstream, request)
        content = response.content
        try:
            peek = _peek.decode(content)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise UpstreamError(
                502, f"{self.upstream.provider} upstream sent invalid JSON: {exc}", retryable=True
            ) from exc
        receipt = _receipt_of(response)
        if peek.usage is not None:
            return EmbedResult(content, _usage(peek.usage), receipt=receipt)
        tokens = sum(estimate_text_tokens(text) for text in call.request.texts())
        return EmbedResult(content, Usage(tokens, 0, tokens), usage_estimated=True, receipt=receipt)


def _receipt_of(response: UpstreamResponse) -> bytes | None:
    value = response.headers.get(RECEIPT_HEADER)
    return value.encode() if value else None


class OpenAIStream:
    def __init__(self, call: ChatCall, upstream: Upstream, response: UpstreamResponse) -> None:
        self.usage: Usage | None = None
        self.usage_estimated = False
        self.receipt: bytes | None = None
        self._call = call
        self._upstream = upstream
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        wants_usage = self._call.request.include_usage
        text: list[str] = []
        finished = False
        async for event in iter_sse(self._response, self._upstream):
            data = event.data
            if data == b"[DONE]":
                finished = True
                break
            if event.event == RECEIPT_EVENT:
                self.receipt = data
                continue
            try:
                peek = _peek.decode(data)
            except (msgspec.DecodeError, RecursionError) as exc:
                raise UpstreamError(
                    502, f"{self._upstream.provider} upstream sent an invalid chunk: {exc}"
                ) from exc
            if peek.error is not None:
                message, _ = openai_error_message(data)
                raise UpstreamError(502, f"{self._upstream.provider} upstream failed: {message}")
            if peek.usage is not None:
                self.usage = _usage(peek.usage)
                if not peek.choices and not wants_usage:
                    continue
            for choice in peek.choices or ():
                finished = finished or choice.finish_reason is not None
                if choice.delta is not None and choice.delta.content:
                    text.append(choice.delta.content)
            yield sse_event(data)
        if not finished:
            # No finish_reason and no [DONE]: the answer was cut off, not complete.
            raise UpstreamError(502, f"{self._upstream.provider} upstream stream ended early")
        if self.usage is None:
            self.usage = _estimated_usage(self._call, "".join(text))
            self.usage_estimated = True

    async def aclose(self) -> None:
        await self._response.aclose()


class AzureOpenAIAdapter(OpenAIAdapter):
    """Azure OpenAI: per-deployment URLs, an `api-version` query and an `api-key` header.

    `base_url` is the resource endpoint (`https://NAME.openai.azure.com`) and `model` the
    deployment name.
    """

    def url(self, endpoint: str) -> str:
        version = self.upstream.api_version or "2024-10-21"
        path = f"openai/deployments/{self.upstream.model}/{endpoint}?api-version={version}"
        return join_url(self.upstream.base_url, path)

    def auth_headers(self) -> dict[str, str]:
        key = self.upstream.api_key
        return {"api-key": key} if key else {}
