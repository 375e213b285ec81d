"""OpenAI-compatible upstreams: OpenAI, OpenRouter, vLLM, LM Studio, llama.cpp, LocalAI, Groq…

The client's request is forwarded field for field (only `model` is replaced, the output cap
lowered to the deployment's `max_output_tokens` or added, and, on streams,
`stream_options.include_usage` forced on so that usage is always counted), and the answer is
passed back byte for byte (`ChatResult.wire`, each chunk an `OpenAIChunk`); the gateway only
peeks at each chunk for usage and errors, and decodes it only for a client of another format.

A deployment that serves OpenAI's Responses API (`responses = true`) is sent a Responses
client's own request instead, at `/responses` (`adapters/openai_responses.py`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
from msgspec import Raw

from adapters.events import OpenAIChunk
from adapters.http import (
    UpstreamClient,
    UpstreamRequest,
    UpstreamResponse,
    build_request,
    iter_sse,
    join_url,
    openai_chunk,
    send,
)
from adapters.openai_completions import CompletionStream
from adapters.openai_responses import NATIVE as RESPONSES
from adapters.openai_responses import ResponsesStream, responses_body, responses_result
from adapters.tokens import (
    NO_COUNT,
    estimate_prompt_tokens,
    estimate_text_tokens,
    token_count,
    usage_or_estimate,
)
from adapters.types import (
    ChatCall,
    ChatResult,
    CompletionCall,
    EmbedCall,
    EmbedResult,
    ImageCall,
    Upstream,
    UpstreamError,
    Usage,
    WireResult,
    sse_event,
)

_INCLUDE_USAGE = Raw(b'{"include_usage":true}')
_TRUE = Raw(b"true")
_FALSE = Raw(b"false")


class _PeekUsage(msgspec.Struct):
    # Untrusted: read by `token_count`, so that a count that is no count is estimated.
    prompt_tokens: Raw = NO_COUNT
    completion_tokens: Raw = NO_COUNT


class _PeekMessage(msgspec.Struct):
    content: str | None = None


class _PeekChoice(msgspec.Struct):
    message: _PeekMessage | None = None
    delta: _PeekMessage | None = None
    finish_reason: str | None = None
    # vLLM's extension: the stop string that ended the choice (or a stop token's id); any
    # other shape is ignored.
    stop_reason: Any = None


class _Peek(msgspec.Struct):
    """What the gateway reads of a response or chunk; everything else passes untouched."""

    choices: list[_PeekChoice] | None = None
    usage: _PeekUsage | None = None
    error: Raw | None = None


_peek = msgspec.json.Decoder(_Peek)


class _PeekText(msgspec.Struct):
    text: str | None = None


class _PeekCompletion(msgspec.Struct):
    """What the gateway reads of a legacy text completion."""

    choices: list[_PeekText] | None = None
    usage: _PeekUsage | None = None


class _PeekImages(msgspec.Struct):
    """What the gateway reads of generated images: how many there are (each item is
    skipped, not decoded: a base64 image is megabytes)."""

    data: list[Raw] | None = None


_peek_completion = msgspec.json.Decoder(_PeekCompletion)
_peek_images = msgspec.json.Decoder(_PeekImages)
# OpenAI's documented default for a legacy completion's `max_tokens`.
COMPLETION_DEFAULT_MAX_TOKENS = 16


def _usage(peek: _PeekUsage, call: ChatCall, completion_text: str) -> tuple[Usage, bool]:
    """The upstream's counts (the total is recomputed, never taken), each estimated if it is
    missing or no count; and whether any was."""
    return usage_or_estimate(
        token_count(peek.prompt_tokens), token_count(peek.completion_tokens), call, completion_text
    )


def _stop_sequence(choice: _PeekChoice | None) -> str | None:
    """The stop string that ended a `stop`, where the server says (vLLM's `stop_reason`)."""
    if choice is None or choice.finish_reason != "stop":
        return None
    return choice.stop_reason if isinstance(choice.stop_reason, str) else None


def _estimated_usage(call: ChatCall, completion_text: str) -> Usage:
    prompt = estimate_prompt_tokens(call.request.messages)
    completion = estimate_text_tokens(completion_text)
    return Usage(prompt, completion, prompt + completion)


def _embed_usage(peek: _PeekUsage | None, call: EmbedCall) -> tuple[Usage, bool]:
    tokens = token_count(peek.prompt_tokens) if peek is not None else None
    if tokens is not None:
        return Usage(tokens, 0, tokens), False
    tokens = sum(estimate_text_tokens(text) for text in call.request.texts())
    return Usage(tokens, 0, tokens), True


def _completion_prompt_tokens(call: CompletionCall) -> int:
    """An estimate of a completion's prompt, when the upstream did not count it."""
    prompt = call.request.prompt
    if isinstance(prompt, str):
        return estimate_text_tokens(prompt)
    if all(isinstance(item, str) for item in prompt):
        return sum(estimate_text_tokens(item) for item in prompt)
    return len(msgspec.json.encode(prompt)) // 4 + 1  # token ids: a rough guess


def _completion_usage(peek: _PeekCompletion, call: CompletionCall) -> tuple[Usage, bool]:
    """The upstream's counts, untrusted (the total recomputed; each estimated if it is
    missing or no count); the pipeline clamps them to the worst case reserved."""
    counted = peek.usage
    prompt = token_count(counted.prompt_tokens) if counted is not None else None
    completion = token_count(counted.completion_tokens) if counted is not None else None
    estimated = prompt is None or completion is None
    if prompt is None:
        prompt = _completion_prompt_tokens(call)
    if completion is None:
        text = "".join(choice.text or "" for choice in peek.choices or ())
        completion = estimate_text_tokens(text)
    return Usage(prompt, completion, prompt + completion), estimated


class OpenAIAdapter:
    """Speaks OpenAI's `/chat/completions`, `/embeddings`, `/completions` and
    `/images/generations` at `base_url`."""

    # Where an upstream that signs what it charged (another aihub node) sends its receipt: a
    # response header, and on a stream an SSE event of its own, never passed on. Named by the
    # subclass that reaches such an upstream (the node's peer adapter): the names are the
    # federation protocol's, which adapters do not import.
    receipt_header: str | None = None
    receipt_event: bytes | None = None

    def __init__(self, upstream: Upstream, client: UpstreamClient) -> None:
        self.upstream = upstream
        self.client = client

    def url(self, endpoint: str) -> str:
        return join_url(self.upstream.base_url or "https://api.openai.com/v1", endpoint)

    def auth_headers(self) -> dict[str, str]:
        key = self.upstream.api_key
        return {"authorization": f"Bearer {key}"} if key else {}

    def _output_cap(self, call: ChatCall) -> dict[str, Raw]:
        """The deployment's output cap, sent whenever the client asked for more or set none:
        the budget reserved at most that many output tokens, so the provider must not be let
        write more. A field the client sent is lowered as it is; with none, OpenAI's own API
        and Azure get `max_completion_tokens` (reasoning models refuse `max_tokens`), other
        OpenAI-compatible servers the `max_tokens` they all read. A limit the gateway set
        (the budget left capped the call) is in `call.request` but not in the client's raw
        fields: it is sent the same way."""
        cap = self.upstream.max_output_tokens
        request = call.request
        if "max_tokens" not in call.raw and "max_completion_tokens" not in call.raw:
            limit = min(request.output_limit or cap, cap)
            return {self._output_field(): Raw(str(limit).encode())}
        if request.max_tokens is None and request.max_completion_tokens is None:
            return {self._output_field(): Raw(str(cap).encode())}
        overrides = {}
        if request.max_tokens is not None and request.max_tokens > cap:
            overrides["max_tokens"] = Raw(str(cap).encode())
        if request.max_completion_tokens is not None and request.max_completion_tokens > cap:
            overrides["max_completion_tokens"] = Raw(str(cap).encode())
        return overrides

    def _output_field(self) -> str:
        official = not self.upstream.base_url or "://api.openai.com" in self.upstream.base_url
        return "max_completion_tokens" if official else "max_tokens"

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

    def responses_url(self) -> str:
        return self.url("responses")

    def _responses_fields(self, call: ChatCall) -> dict[str, Raw] | None:
        """A Responses client's own request, if this deployment serves that API."""
        return call.native_for(RESPONSES) if self.upstream.responses else None

    async def _responses_post(
        self, call: ChatCall, fields: dict[str, Raw], *, stream: bool
    ) -> UpstreamResponse:
        body = responses_body(fields, call, self.upstream, stream=stream)
        url = self.responses_url()
        headers = self.request_headers(url, body, call.request_id)
        request = build_request(self.upstream, url, body, headers)
        return await send(self.client, self.upstream, request, stream=stream)

    async def chat(self, call: ChatCall) -> ChatResult:
        native = self._responses_fields(call)
        if native is not None:
            response = await self._responses_post(call, native, stream=False)
            return responses_result(call, self.upstream, response.content)
        body = self._body(call.raw, stream=_FALSE, **self._output_cap(call))
        request = self._request("chat/completions", body, call.request_id)
        response = await send(self.client, self.upstream, request)
        content = response.content
        try:
            peek = _peek.decode(content)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise UpstreamError(
                502, f"{self.upstream.provider} upstream sent invalid JSON: {exc}", retryable=True
            ) from exc
        receipt = self._receipt_of(response)
        text = "".join(
            (choice.message.content or "") for choice in peek.choices or () if choice.message
        )
        matched = _stop_sequence(peek.choices[0] if peek.choices else None)
        if peek.usage is not None:
            usage, estimated = _usage(peek.usage, call, text)
        else:
            usage, estimated = _estimated_usage(call, text), True
        return ChatResult(
            wire=content,
            usage=usage,
            usage_estimated=estimated,
            receipt=receipt,
            stop_sequence=matched,
        )

    async def open_stream(self, call: ChatCall) -> OpenAIStream | ResponsesStream:
        native = self._responses_fields(call)
        if native is not None:
            response = await self._responses_post(call, native, stream=True)
            return ResponsesStream(call, self.upstream, response)
        body = self._body(
            call.raw, stream=_TRUE, stream_options=_INCLUDE_USAGE, **self._output_cap(call)
        )
        request = self._request("chat/completions", body, call.request_id)
        response = await send(self.client, self.upstream, request, stream=True)
        return OpenAIStream(call, self.upstream, response, self.receipt_event)

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
        usage, estimated = _embed_usage(peek.usage, call)
        return EmbedResult(
            wire=content, usage=usage, usage_estimated=estimated, receipt=self._receipt_of(response)
        )

    def _completion_cap(self, call: CompletionCall) -> dict[str, Raw]:
        """`max_tokens` held to the deployment's cap, and sent as OpenAI's default (16) when
        the client set none: the upstream writes no more than the budget reserved."""
        cap = self.upstream.max_output_tokens
        asked = call.request.max_tokens
        if asked is None:
            return {"max_tokens": Raw(str(min(COMPLETION_DEFAULT_MAX_TOKENS, cap)).encode())}
        return {"max_tokens": Raw(str(cap).encode())} if asked > cap else {}

    async def _post(self, endpoint: str, body: bytes, request_id: str) -> UpstreamResponse:
        request = self._request(endpoint, body, request_id)
        return await send(self.client, self.upstream, request)

    def _invalid_json(self, exc: Exception) -> UpstreamError:
        message = f"{self.upstream.provider} upstream sent invalid JSON: {exc}"
        return UpstreamError(502, message, retryable=True)

    async def complete(self, call: CompletionCall) -> WireResult:
        """A legacy text completion, passed through (not streamed) and answered as it came."""
        body = self._body(call.raw, stream=_FALSE, **self._completion_cap(call))
        response = await self._post("completions", body, call.request_id)
        try:
            peek = _peek_completion.decode(response.content)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise self._invalid_json(exc) from exc
        usage, estimated = _completion_usage(peek, call)
        return WireResult(
            wire=response.content,
            usage=usage,
            usage_estimated=estimated,
            receipt=self._receipt_of(response),
        )

    async def open_completion_stream(self, call: CompletionCall) -> CompletionStream:
        """A legacy text completion, streamed: its chunks passed through as they came."""
        body = self._body(
            call.raw, stream=_TRUE, stream_options=_INCLUDE_USAGE, **self._completion_cap(call)
        )
        request = self._request("completions", body, call.request_id)
        response = await send(self.client, self.upstream, request, stream=True)
        prompt = _completion_prompt_tokens(call)
        return CompletionStream(call, self.upstream, response, prompt, self.receipt_event)

    async def images(self, call: ImageCall) -> WireResult:
        """Generated images, passed through and answered as they came; counted as the
        `data` items sent, never more than the `n` asked (and reserved)."""
        body = self._body(call.raw, stream=_FALSE)
        response = await self._post("images/generations", body, call.request_id)
        try:
            peek = _peek_images.decode(response.content)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise self._invalid_json(exc) from exc
        count = min(len(peek.data or ()), call.request.n)
        return WireResult(
            wire=response.content,
            usage=Usage(0, count, count),
            receipt=self._receipt_of(response),
        )

    def _receipt_of(self, response: UpstreamResponse) -> bytes | None:
        if self.receipt_header is None:
            return None
        value = response.headers.get(self.receipt_header)
        return value.encode() if value else None


class OpenAIStream:
    def __init__(
        self,
        call: ChatCall,
        upstream: Upstream,
        response: UpstreamResponse,
        receipt_event: bytes | None = None,
    ) -> None:
        self.usage: Usage | None = None
        self.usage_estimated = False
        self.receipt: bytes | None = None
        self._call = call
        self._upstream = upstream
        self._response = response
        self._receipt_event = receipt_event

    async def __aiter__(self) -> AsyncIterator[OpenAIChunk]:
        wants_usage = self._call.request.include_usage
        receipt_event = self._receipt_event
        text: list[str] = []
        finished = False
        async for event in iter_sse(self._response, self._upstream):
            data = event.data
            if data == b"[DONE]":
                finished = True
                self._response.complete()
                break
            if receipt_event is not None and event.event == receipt_event:
                self.receipt = data
                continue
            peek = openai_chunk(_peek, data, self._upstream)
            for choice in peek.choices or ():
                finished = finished or choice.finish_reason is not None
                if choice.delta is not None and choice.delta.content:
                    text.append(choice.delta.content)
            if peek.usage is not None:
                self.usage, self.usage_estimated = _usage(peek.usage, self._call, "".join(text))
                if not peek.choices and not wants_usage:
                    continue
            yield OpenAIChunk(sse_event(data))
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

    def responses_url(self) -> str:
        # Azure's v1 API: one path for the resource, the deployment named by `model`.
        return join_url(self.upstream.base_url, "openai/v1/responses")

    def _output_field(self) -> str:
        return "max_completion_tokens"  # since API version 2024-09-01, reasoning models too
