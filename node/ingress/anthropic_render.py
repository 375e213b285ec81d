"""What the pipeline hands back, in Anthropic's Messages format.

A complete answer is a `message` object, from the adapter's typed completion
(`ChatResult.chat_completion()`). A stream is Anthropic's SSE events, rendered from the neutral
events (`adapters/events.py`; an OpenAI-compatible upstream's chunks are decoded into them
first): `message_start` and a `ping`, then per content block `content_block_start`, its
`text_delta`s or `input_json_delta`s and `content_block_stop`, then `message_delta` (stop
reason and usage) and `message_stop` once the pipeline says the stream is complete, since an
OpenAI-compatible upstream reports the usage after its finish reason. A failure mid-stream is
an `error` event. Our receipt for a peer is not sent on this surface (peers call each other
through chat completions).

An Anthropic upstream that was sent the client's own request answers in this very format: its
`message` (`ChatResult.native`) and its events (`NativeEvent`s, its own `message_delta` and
`message_stop` among them) are passed on as they came.

A stop sequence that ended the answer is Anthropic's `stop_sequence` stop reason, with the
sequence named, when the upstream said which one it was and it is one of the client's.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import Struct

from adapters.events import (
    Event,
    Finish,
    NativeEvent,
    OpenAIChunk,
    RefusalDelta,
    Start,
    TextDelta,
    ToolCallDelta,
    ToolCallFragment,
    UsageReport,
)
from adapters.types import ChatResult, Usage
from node.errors import HubError, UpstreamFailed
from node.gateway.pipeline import ReceiptIssued, Signal, StreamEnd, StreamFailed
from node.ingress.anthropic_errors import (
    AnthropicError,
    AnthropicErrorDetail,
    anthropic_error,
    status_type,
)

_encode = msgspec.json.Encoder().encode

# OpenAI's finish reasons (the adapters' vocabulary) as Anthropic's stop reasons.
_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


class MessageUsage(Struct):
    input_tokens: int
    output_tokens: int


class TextContent(Struct, tag_field="type", tag="text"):
    text: str


class ToolUseContent(Struct, tag_field="type", tag="tool_use"):
    id: str
    name: str
    input: dict[str, Any]


class MessageBody(Struct, tag_field="type", tag="message"):
    id: str
    model: str
    content: list[TextContent | ToolUseContent]
    stop_reason: str | None
    usage: MessageUsage
    role: Literal["assistant"] = "assistant"
    stop_sequence: str | None = None


class TextDeltaBody(Struct, tag_field="type", tag="text_delta"):
    text: str


class JsonDeltaBody(Struct, tag_field="type", tag="input_json_delta"):
    partial_json: str


class BlockDelta(Struct, tag_field="type", tag="content_block_delta"):
    """`content_block_delta`, the event a stream sends most: encoded from a Struct."""

    index: int
    delta: TextDeltaBody | JsonDeltaBody


_BLOCK_DELTA = b"event: content_block_delta\ndata: "


def message_id(request_id: str) -> str:
    """The message's id: the request's (`aihub-request-id`, the usage row's), as `msg_…`."""
    return "msg_" + request_id.removeprefix("req_")


def stop_reason(finish_reason: str | None) -> str:
    return _STOP_REASONS.get(finish_reason or "stop", "end_turn")


_arguments = msgspec.json.Decoder()


def tool_input(arguments: str | None) -> dict[str, Any]:
    """A tool call's input object, from OpenAI's JSON string of arguments. What is no JSON
    object (a model may write anything) is kept whole, under `arguments`, rather than lost."""
    if not arguments:
        return {}
    try:
        value = _arguments.decode(arguments)
    except msgspec.DecodeError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"arguments": arguments}


def matched_stop(sequence: str | None, stop_sequences: list[str] | None) -> str | None:
    """An upstream's word for the stop sequence that ended the answer, if it is the
    client's."""
    return sequence if sequence is not None and sequence in (stop_sequences or ()) else None


def message_body(
    result: ChatResult, request_id: str, model: str, stop_sequences: list[str] | None = None
) -> bytes:
    """A complete answer as Anthropic's `message` object (an Anthropic upstream's, as it
    came)."""
    if result.native is not None:
        return result.native
    completion = result.chat_completion()
    choice = completion.choices[0] if completion.choices else None
    content: list[TextContent | ToolUseContent] = []
    reason = "end_turn"
    if choice is not None:
        message = choice.message
        text = (message.content or "") + (message.refusal or "")
        if text:
            content.append(TextContent(text))
        for index, call in enumerate(message.tool_calls or ()):
            call_id = call.id or f"toolu_{index}"
            function = call.function
            content.append(
                ToolUseContent(call_id, function.name or "", tool_input(function.arguments))
            )
        reason = "refusal" if message.refusal else stop_reason(choice.finish_reason)
        if message.tool_calls and reason == "end_turn":
            reason = "tool_use"
    usage = MessageUsage(result.usage.prompt_tokens, result.usage.completion_tokens)
    matched = matched_stop(result.stop_sequence, stop_sequences) if reason == "end_turn" else None
    if matched is not None:
        reason = "stop_sequence"
    body = MessageBody(
        message_id(request_id),
        completion.model or model,
        content,
        reason,
        usage,
        stop_sequence=matched,
    )
    return _encode(body)


def sse(event: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _encode(payload) + b"\n\n"


def stream_error(error: HubError) -> bytes:
    """A failure mid-stream as Anthropic's `error` event."""
    if isinstance(error, UpstreamFailed):
        upstream = error.upstream
        detail = AnthropicErrorDetail(status_type(upstream.status), upstream.message)
    else:
        detail = anthropic_error(error).detail
    return b"event: error\ndata: " + _encode(AnthropicError(detail)) + b"\n\n"


class MessageStreamRenderer:
    """One stream's items as Anthropic's events. Stateful per stream: which content block is
    open (text, or the tool call of which index), and the stop reason and usage that the
    closing `message_delta` tells."""

    def __init__(
        self,
        request_id: str,
        model: str,
        input_tokens: int,
        stop_sequences: list[str] | None = None,
    ) -> None:
        self._id = message_id(request_id)
        self._stop_sequences = stop_sequences
        self._stop_sequence: str | None = None
        # An Anthropic upstream's own events, passed on: they close the message themselves.
        self._native = False
        self._model = model
        self._usage = Usage(input_tokens, 0, input_tokens)
        self._usage_reported = False
        self._deltas = 0
        self._started = False
        self._blocks = 0  # blocks opened so far: the next one's index
        self._open: str | int | None = None  # "text", a tool call's index, or nothing
        self._reason: str | None = None
        self._called = False  # any tool call yet?

    def render(self, item: Any) -> bytes:
        if type(item) is NativeEvent:
            self._native = True
            return item.sse()
        if isinstance(item, Signal):
            return self._signal(item)
        if type(item) is OpenAIChunk:
            out = b""
            for event in item.events():
                out += self._event(event)
            return out
        return self._event(item)

    def _signal(self, signal: Signal) -> bytes:
        if isinstance(signal, StreamEnd):
            if self._native:
                return b""
            return self._start() + self._close() + self._end()
        if isinstance(signal, ReceiptIssued):
            return b""  # peers do not call each other on this surface
        assert isinstance(signal, StreamFailed)
        return stream_error(signal.error)

    def _event(self, event: Event) -> bytes:
        if getattr(event, "choice", 0) != 0:
            return b""  # Anthropic's messages have one choice
        if type(event) is Start:
            if event.model and not self._started:
                self._model = event.model
            return self._start()
        if type(event) in (TextDelta, RefusalDelta):
            if type(event) is RefusalDelta:
                self._reason = "refusal"
            return self._start() + self._text(event.text)  # type: ignore[union-attr]
        if type(event) is ToolCallDelta:
            return self._start() + b"".join(self._tool(fragment) for fragment in event.calls)
        if type(event) is Finish:
            if self._reason != "refusal":
                reason = stop_reason(event.reason)
                self._reason = "tool_use" if self._called and reason == "end_turn" else reason
                matched = matched_stop(event.stop_sequence, self._stop_sequences)
                if self._reason == "end_turn" and matched is not None:
                    self._reason, self._stop_sequence = "stop_sequence", matched
            return self._start() + self._close()
        if type(event) is UsageReport:
            self._usage = event.usage
            self._usage_reported = True
            return b""
        raise TypeError(f"not a stream event: {event!r}")

    def _start(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        message = {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": self._model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self._usage.prompt_tokens, "output_tokens": 0},
        }
        return sse("message_start", {"type": "message_start", "message": message}) + sse(
            "ping", {"type": "ping"}
        )

    def _open_block(self, kind: str | int, block: dict[str, Any]) -> bytes:
        closed = self._close()
        self._open = kind
        index = self._blocks
        self._blocks += 1
        start = {"type": "content_block_start", "index": index, "content_block": block}
        return closed + sse("content_block_start", start)

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        stop = {"type": "content_block_stop", "index": self._blocks - 1}
        return sse("content_block_stop", stop)

    def _delta(self, delta: TextDeltaBody | JsonDeltaBody) -> bytes:
        self._deltas += 1
        return _BLOCK_DELTA + _encode(BlockDelta(self._blocks - 1, delta)) + b"\n\n"

    def _text(self, text: str) -> bytes:
        if not text:
            return b""
        if self._open == "text":  # the hot path: one more piece of the open text block
            return self._delta(TextDeltaBody(text))
        opened = self._open_block("text", {"type": "text", "text": ""})
        return opened + self._delta(TextDeltaBody(text))

    def _tool(self, fragment: ToolCallFragment) -> bytes:
        opened = b""
        if self._open != fragment.index or fragment.id is not None:
            block = {
                "type": "tool_use",
                "id": fragment.id or f"toolu_{self._id}_{fragment.index}",
                "name": fragment.name or "",
                "input": {},
            }
            opened = self._open_block(fragment.index, block)
            self._called = True
        if not fragment.arguments:
            return opened
        return opened + self._delta(JsonDeltaBody(fragment.arguments))

    def _fallback(self) -> str:
        """The stop reason of a stream that ended without a finish reason."""
        return "tool_use" if self._called else "end_turn"

    def _end(self) -> bytes:
        usage = self._usage
        output = usage.completion_tokens if self._usage_reported else self._deltas
        delta = {
            "type": "message_delta",
            "delta": {
                "stop_reason": self._reason or self._fallback(),
                "stop_sequence": self._stop_sequence,
            },
            "usage": {"input_tokens": usage.prompt_tokens, "output_tokens": output},
        }
        return sse("message_delta", delta) + sse("message_stop", {"type": "message_stop"})
