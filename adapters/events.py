"""What a chat stream yields: neutral events, one step of the answer each, in no API's format.

An adapter translates its provider's stream into these (Anthropic's `content_block_delta` is a
`TextDelta` or a `ToolCallDelta`, an Ollama line a `TextDelta`, …), and each ingress renders
them in its own format: OpenAI's `chat.completion.chunk`s, Anthropic's Messages events or the
Responses API's events. The steps are what all three share: a message begins (its id, model and
time), text, refusal text and tool-call fragments arrive, a choice finishes for a reason, usage
is counted. Events that belong to one choice carry its index, for OpenAI's `n > 1`; the other
two formats have one choice (0).

Two members are not neutral, on purpose: `OpenAIChunk` is a chunk exactly as an
OpenAI-compatible upstream sent it. An OpenAI ingress passes its bytes on untouched (the fast
path: no decode, no encode); any other ingress asks it for its neutral events
(`OpenAIChunk.events`), decoded once. `NativeEvent` is an event of an upstream that speaks the
client's own API (`ChatCall.native`: Anthropic's events to a Messages client, the Responses
API's to a Responses client), which only that ingress is ever given, and passes on as it came.

How each format is rendered from them (one renderer per stream, which keeps the message's
envelope from the first `Start`):

- `Start`: OpenAI's `delta.role`; Anthropic's `message_start`; Responses' `response.created`.
- `TextDelta`: `delta.content`; a text block's `text_delta` (a new block after a tool call);
  `response.output_text.delta`.
- `RefusalDelta`: `delta.refusal`; text with the `refusal` stop reason; `response.refusal.delta`.
- `ToolCallDelta`: `delta.tool_calls`; a fragment with an `id` opens a `tool_use` block, the
  rest are its `input_json_delta`s; an output item per call and its
  `response.function_call_arguments.delta`s.
- `Finish`: `finish_reason`; `content_block_stop` and `message_delta`'s `stop_reason` (with
  its `stop_sequence`, when the upstream said which one ended the answer); `response.completed`
  (`response.incomplete` for `length`).
- `UsageReport`: the usage-only chunk; `message_delta`'s `usage`; `response.completed`'s.

The union is tagged (`type`), so a stream's events can be encoded and decoded as they are by
msgspec (`Event` is the type to decode).
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import Raw, Struct

from adapters.tokens import NO_COUNT, token_count
from adapters.types import UpstreamError, Usage


class _Event(Struct, tag_field="type", omit_defaults=True):
    """The base of every stream event: tagged by `type`."""


class Start(_Event, tag="start"):
    """A choice of the answer began: the assistant's turn. The first `Start` of a stream names
    the message (id, model, creation time in Unix seconds) for every event after it."""

    id: str
    model: str
    created: int
    choice: int = 0


class TextDelta(_Event, tag="text"):
    """More of the answer's text."""

    text: str
    choice: int = 0


class RefusalDelta(_Event, tag="refusal"):
    """More of the model's refusal (OpenAI's `refusal`; Anthropic's `refusal` stop reason has
    no text of its own)."""

    text: str
    choice: int = 0


class ToolCallFragment(Struct, omit_defaults=True):
    """A piece of one tool call: its first names it (`id`, `name`), the rest add fragments of
    its JSON arguments. `index` numbers the calls of a choice from 0, in the order they began.
    A field that is None was not sent in this piece (an empty string was)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Event, tag="tool_calls"):
    """Pieces of tool calls that arrived together (Ollama sends several whole calls at once)."""

    calls: list[ToolCallFragment]
    choice: int = 0


class Finish(_Event, tag="finish"):
    """A choice ended, for OpenAI's reason: `stop`, `length`, `tool_calls` or
    `content_filter` (adapters map their provider's reasons onto these). A `stop` that one of
    the client's stop sequences caused names it in `stop_sequence`, when the upstream said
    which (Anthropic does; vLLM's chunks do, as `stop_reason`); untrusted, so an ingress
    reports it only if it is one of the client's."""

    reason: str
    choice: int = 0
    stop_sequence: str | None = None


class UsageReport(_Event, tag="usage"):
    """The stream's token counts, sent to the client only when it asked for them; the stream's
    `usage` attribute has them either way."""

    usage: Usage


class OpenAIChunk(_Event, tag="openai_chunk"):
    """One `chat.completion.chunk` SSE event (`b"data: {...}\\n\\n"`) exactly as an
    OpenAI-compatible upstream sent it: passed on as it is to an OpenAI client, decoded into
    neutral events only for another ingress."""

    sse: bytes

    def events(self) -> list[NeutralEvent]:
        """The chunk's neutral events, in the order OpenAI's fields say them: per choice its
        start (a `role`), text, refusal, tool calls and finish; then the usage."""
        try:
            chunk = _chunk_decoder.decode(memoryview(self.sse)[6:-2])
        except (msgspec.DecodeError, RecursionError) as exc:
            raise UpstreamError(502, f"upstream sent an invalid chunk: {exc}") from exc
        events: list[NeutralEvent] = []
        for choice in chunk.choices:
            events.extend(_choice_events(chunk, choice))
        if chunk.usage is not None:
            events.append(UsageReport(_wire_usage(chunk.usage)))
        return events


class NativeEvent(_Event, tag="native"):
    """One server-sent event of an upstream that speaks the client's own API, as it came:
    its name (`message_start`, `response.output_text.delta`, …) and its data (one line)."""

    event: str
    data: bytes

    def sse(self) -> bytes:
        return b"event: " + self.event.encode() + b"\ndata: " + self.data + b"\n\n"


def native_event(event: bytes, data: bytes) -> NativeEvent:
    """An upstream's SSE event, kept as one `data:` line: a JSON text split over several lines
    is the same text with spaces for the breaks (JSON strings hold no raw line breaks)."""
    if b"\n" in data:
        data = data.replace(b"\n", b" ")
    return NativeEvent(event.decode(errors="replace"), data)


NeutralEvent = Start | TextDelta | RefusalDelta | ToolCallDelta | Finish | UsageReport
Event = NeutralEvent | OpenAIChunk | NativeEvent


# --- OpenAI's chunk, read leniently (what an upstream leaves out is absent, not an error) -----


class _WireFunction(Struct):
    name: str | None = None
    arguments: str | None = None


class _WireToolCall(Struct):
    index: int = 0
    id: str | None = None
    function: _WireFunction | None = None


class _WireDelta(Struct):
    role: str | None = None
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[_WireToolCall] | None = None


class _WireChoice(Struct):
    index: int = 0
    delta: _WireDelta = msgspec.field(default_factory=_WireDelta)
    finish_reason: str | None = None
    # vLLM's extension: the stop string that ended the choice (or a stop token's id); any
    # other shape is ignored, not an error.
    stop_reason: Any = None


class _WireUsage(Struct):
    # Untrusted: read by `token_count`, as the adapters read every count.
    prompt_tokens: Raw = NO_COUNT
    completion_tokens: Raw = NO_COUNT


class _WireChunk(Struct):
    id: str = ""
    model: str = ""
    created: int = 0
    choices: list[_WireChoice] = []
    usage: _WireUsage | None = None


_chunk_decoder = msgspec.json.Decoder(_WireChunk)


def _choice_events(chunk: _WireChunk, choice: _WireChoice) -> list[NeutralEvent]:
    delta, index = choice.delta, choice.index
    events: list[NeutralEvent] = []
    if delta.role is not None:
        events.append(Start(chunk.id, chunk.model, chunk.created, index))
    if delta.content:
        events.append(TextDelta(delta.content, index))
    if delta.refusal:
        events.append(RefusalDelta(delta.refusal, index))
    if delta.tool_calls:
        calls = [_fragment(call) for call in delta.tool_calls]
        events.append(ToolCallDelta(calls, index))
    if choice.finish_reason is not None:
        matched = choice.stop_reason if isinstance(choice.stop_reason, str) else None
        events.append(Finish(choice.finish_reason, index, matched))
    return events


def _fragment(call: _WireToolCall) -> ToolCallFragment:
    function = call.function or _WireFunction()
    return ToolCallFragment(call.index, call.id, function.name, function.arguments)


def _wire_usage(usage: _WireUsage) -> Usage:
    prompt = token_count(usage.prompt_tokens) or 0
    completion = token_count(usage.completion_tokens) or 0
    return Usage(prompt, completion, prompt + completion)
