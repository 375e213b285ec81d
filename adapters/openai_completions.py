"""A legacy text completion streamed (`POST /v1/completions` with `stream: true`) from an
OpenAI-compatible upstream: its `text_completion` chunks passed on as they came (each an
`OpenAIChunk`, which only OpenAI's own surface is given), read for the text written and the
usage. `stream_options.include_usage` is forced on so that the upstream counts; the usage-only
chunk is passed on only to a client that asked for it.

The stream's `usage` is never empty: it starts as the prompt's estimate and what was written
so far, so that a stream cut short, or never read, is settled by what it could have used.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
from msgspec import Raw

from adapters.events import OpenAIChunk
from adapters.http import UpstreamResponse, iter_sse, openai_chunk
from adapters.tokens import NO_COUNT, estimate_text_tokens, token_count
from adapters.types import CompletionCall, Upstream, UpstreamError, Usage, sse_event


class _PeekUsage(msgspec.Struct):
    prompt_tokens: Raw = NO_COUNT
    completion_tokens: Raw = NO_COUNT


class _PeekChoice(msgspec.Struct):
    text: str | None = None
    finish_reason: str | None = None


class _PeekChunk(msgspec.Struct):
    choices: list[_PeekChoice] | None = None
    usage: _PeekUsage | None = None
    error: Raw | None = None


_chunk_decoder = msgspec.json.Decoder(_PeekChunk)


class CompletionStream:
    def __init__(
        self,
        call: CompletionCall,
        upstream: Upstream,
        response: UpstreamResponse,
        prompt_estimate: int,
        receipt_event: bytes | None = None,
    ) -> None:
        self.usage: Usage | None = Usage(prompt_estimate, 0, prompt_estimate)
        self.usage_estimated = True
        self.receipt: bytes | None = None
        self._call = call
        self._upstream = upstream
        self._response = response
        self._prompt = prompt_estimate
        self._receipt_event = receipt_event
        self._written: list[str] = []

    def _estimate(self) -> None:
        completion = estimate_text_tokens("".join(self._written))
        self.usage = Usage(self._prompt, completion, self._prompt + completion)
        self.usage_estimated = True

    def _counted(self, usage: _PeekUsage) -> None:
        """The upstream's counts, untrusted: each estimated if it is no count."""
        prompt = token_count(usage.prompt_tokens)
        completion = token_count(usage.completion_tokens)
        estimated = prompt is None or completion is None
        prompt = self._prompt if prompt is None else prompt
        if completion is None:
            completion = estimate_text_tokens("".join(self._written))
        self.usage = Usage(prompt, completion, prompt + completion)
        self.usage_estimated = estimated

    async def __aiter__(self) -> AsyncIterator[OpenAIChunk]:
        wants_usage = self._call.request.include_usage
        finished = counted = False
        async for event in iter_sse(self._response, self._upstream):
            data = event.data
            if data == b"[DONE]":
                finished = True
                self._response.complete()
                break
            if self._receipt_event is not None and event.event == self._receipt_event:
                self.receipt = data
                continue
            peek = openai_chunk(_chunk_decoder, data, self._upstream)
            for choice in peek.choices or ():
                finished = finished or choice.finish_reason is not None
                if choice.text:
                    self._written.append(choice.text)
            if peek.usage is not None:
                self._counted(peek.usage)
                counted = True
                if not peek.choices and not wants_usage:
                    continue
            elif not counted:
                self._estimate()
            yield OpenAIChunk(sse_event(data))
        if not finished:
            raise UpstreamError(502, f"{self._upstream.provider} upstream stream ended early")

    async def aclose(self) -> None:
        await self._response.aclose()
