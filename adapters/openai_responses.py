"""OpenAI's Responses API, passed through: a Responses client's own request for an upstream
that serves `/responses` (OpenAI's own API does; a deployment says so with `responses = true`).

The request goes out as the Responses ingress built it (`ChatCall.native`, API
`openai.responses`), with only `model`, the output cap (`max_output_tokens`, the most the
budget reserved) and `stream` set here. The answer comes back as it came: the `response`
object (`ChatResult.native`), or each stream event as a `NativeEvent`. The gateway reads of it
only what it must: the usage of the `response` (in a stream, of its last snapshot:
`response.completed`, `.incomplete` or `.failed`), untrusted like every count, the text
written (for an estimate if a stream is cut short or counts are missing) and errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
from msgspec import Raw, Struct

from adapters.events import NativeEvent, native_event
from adapters.http import UpstreamResponse, decode_json, iter_sse
from adapters.streams import CountedStream
from adapters.tokens import NO_COUNT, token_count, usage_or_estimate
from adapters.types import ChatCall, ChatResult, Upstream, UpstreamError, Usage

NATIVE = "openai.responses"
_TRUE = Raw(b"true")
_FALSE = Raw(b"false")
# The snapshots a stream opens with: held back until what follows them, so that a failure
# right after them can still fall back to another deployment.
OPENING = frozenset({"response.created", "response.in_progress", "response.queued"})
# The snapshots that end a stream.
TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})


class _PeekUsage(Struct):
    # Untrusted: read by `token_count`, so that a count that is no count is estimated.
    input_tokens: Raw = NO_COUNT
    output_tokens: Raw = NO_COUNT


class _PeekPart(Struct):
    text: str | None = None


class _PeekItem(Struct):
    content: list[_PeekPart] | None = None
    arguments: str | None = None


class _PeekResponse(Struct):
    """What the gateway reads of a `response`: its usage and, for an estimate, its text."""

    output: list[_PeekItem] | None = None
    usage: _PeekUsage | None = None


class _PeekEvent(Struct):
    """What the gateway reads of a stream event; everything else passes untouched."""

    type: str = ""
    # Text and arguments arrive as strings; other deltas (of event types added later) may be
    # anything, and are only passed on.
    delta: Any = None
    response: _PeekResponse | None = None
    # An `error` event says what failed at the top level.
    message: Any = None
    code: Any = None


_response_decoder = msgspec.json.Decoder(_PeekResponse)
_event_decoder = msgspec.json.Decoder(_PeekEvent)


def responses_body(
    fields: dict[str, Raw], call: ChatCall, upstream: Upstream, *, stream: bool
) -> bytes:
    """The Responses request as the upstream gets it: the deployment's model, the output cap
    held to the deployment's (the budget reserved at most that many), and `stream`."""
    cap = upstream.max_output_tokens
    asked = call.request.output_limit
    body = dict(fields)
    body["model"] = Raw(msgspec.json.encode(upstream.model))
    body["max_output_tokens"] = Raw(str(min(asked or cap, cap)).encode())
    body["stream"] = _TRUE if stream else _FALSE
    return msgspec.json.encode(body)


def _written(response: _PeekResponse | None) -> str:
    if response is None:
        return ""
    texts = []
    for item in response.output or ():
        texts.extend(part.text or "" for part in item.content or ())
        texts.append(item.arguments or "")
    return "".join(texts)


def _usage(call: ChatCall, usage: _PeekUsage | None, written: str) -> tuple[Usage, bool]:
    """The upstream's counts (the total recomputed), each estimated if missing or no count."""
    prompt = token_count(usage.input_tokens) if usage is not None else None
    completion = token_count(usage.output_tokens) if usage is not None else None
    return usage_or_estimate(prompt, completion, call, written)


def responses_result(call: ChatCall, upstream: Upstream, content: bytes) -> ChatResult:
    """A complete `response`, as it came, with its usage."""
    response = decode_json(_response_decoder, content, upstream)
    usage, estimated = _usage(call, response.usage, _written(response))
    return ChatResult(native=content, usage=usage, usage_estimated=estimated)


class ResponsesStream(CountedStream):
    """A Responses stream's events, passed on as they came (`NativeEvent`s) and read for the
    usage of its last snapshot; an `error` event, or an end before a last snapshot, is the
    upstream failing (`UpstreamError`)."""

    def __init__(self, call: ChatCall, upstream: Upstream, response: UpstreamResponse) -> None:
        super().__init__(call, upstream, response)

    async def _events(self) -> AsyncIterator[NativeEvent]:
        held: list[NativeEvent] = []
        started = False
        async for sse in iter_sse(self._response, self._upstream):
            peek = decode_json(_event_decoder, sse.data, self._upstream)
            kind = peek.type
            if kind == "error":
                failure = str(peek.message or peek.code or "unknown error")[:500]
                raise UpstreamError(
                    502, f"{self._upstream.provider} upstream failed mid-stream: {failure}"
                )
            if isinstance(peek.delta, str):
                self._written.append(peek.delta)
            event = native_event(sse.event, sse.data)
            if not started and kind in OPENING:
                held.append(event)
                continue
            started = True
            for early in held:
                yield early
            held = []
            yield event
            if kind in TERMINAL:
                self._response.complete()
                written = _written(peek.response) or "".join(self._written)
                usage = peek.response.usage if peek.response is not None else None
                self.usage, self.usage_estimated = _usage(self._call, usage, written)
                return
        raise UpstreamError(
            502, f"{self._upstream.provider} upstream stream ended early", retryable=True
        )

    async def aclose(self) -> None:
        await self._response.aclose()
