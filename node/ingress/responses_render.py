"""What the pipeline hands back, in the Responses API's format: a complete `response`
object from a chat result, and a stream's typed events from its neutral events.

Both read the chat answer of choice 0 (a Responses request has one choice). A stream's
renderer keeps the output items as they grow, so that each `.done` event and the final
`response.completed` (or `.incomplete`, `.failed`) carry them whole, with the usage. An
upstream that speaks the Responses API itself answers in this format already: its events are
passed on (`responses_native.NativeStream`), and a failure after them is a
`response.failed`, as here.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from adapters.events import (
    Event,
    Finish,
    NativeEvent,
    NeutralEvent,
    OpenAIChunk,
    RefusalDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallFragment,
    UsageReport,
)
from adapters.types import ChatResult, Usage
from federation.ids import random_hex
from node.errors import HubError, UpstreamFailed
from node.gateway.pipeline import ReceiptIssued, Signal, StreamEnd, StreamFailed
from node.ingress.errors import openai_error
from node.ingress.responses_native import NativeStream
from node.ingress.responses_wire import (
    ArgumentsDelta,
    ArgumentsDone,
    Completed,
    Created,
    Failed,
    Incomplete,
    IncompleteDetails,
    InProgress,
    ItemAdded,
    ItemDone,
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    OutputTextPart,
    PartAdded,
    PartDone,
    RefusalDeltaEvent,
    RefusalDone,
    RefusalOutputPart,
    Response,
    ResponseError,
    ResponsesRequest,
    ResponseUsage,
    StreamEvent,
    TextConfig,
    TextDeltaEvent,
    TextDone,
)

_encode = msgspec.json.Encoder().encode

# A chat finish reason that leaves a response incomplete, and why in the Responses' words.
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def response_id(request_id: str) -> str:
    """The response's id names the request's (`req_…` → `resp_…`): its usage row and receipt."""
    return "resp_" + request_id.removeprefix("req_")


def _item_id(prefix: str) -> str:
    return f"{prefix}_{random_hex(12)}"


def usage_of(usage: Usage) -> ResponseUsage:
    return ResponseUsage(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)


class Shell(msgspec.Struct):
    """What every rendering of one response repeats: its id, time and the request's fields."""

    id: str
    created_at: int
    request: ResponsesRequest

    @classmethod
    def of(cls, request: ResponsesRequest, request_id: str) -> Shell:
        return cls(response_id(request_id), int(time.time()), request)

    def response(
        self,
        status: str,
        output: list[OutputItem],
        usage: ResponseUsage | None = None,
        incomplete: str | None = None,
        error: ResponseError | None = None,
    ) -> Response:
        request = self.request
        return Response(
            id=self.id,
            created_at=self.created_at,
            status=status,
            model=request.model,
            output=output,
            tools=request.function_tools(),
            tool_choice=request.tool_choice or "auto",
            parallel_tool_calls=request.parallel_tool_calls is not False,
            text=request.text or TextConfig(),
            usage=usage,
            incomplete_details=IncompleteDetails(incomplete) if incomplete else None,
            error=error,
            instructions=request.instructions,
            metadata=request.metadata or {},
            max_output_tokens=request.max_output_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            reasoning=request.reasoning,
            store=request.store is not False,  # OpenAI's default: kept
            previous_response_id=request.previous_response_id,
            user=request.user,
        )


# --- a complete answer ---------------------------------------------------------------------


def complete_response(shell: Shell, result: ChatResult) -> Response:
    completion = result.chat_completion()
    choice = completion.choices[0] if completion.choices else None
    output: list[OutputItem] = []
    reason = None
    if choice is not None:
        message = choice.message
        parts: list[Any] = []
        if message.content:
            parts.append(OutputTextPart(message.content))
        if message.refusal:
            parts.append(RefusalOutputPart(message.refusal))
        if parts:
            output.append(OutputMessage(_item_id("msg"), "completed", parts))
        for call in message.tool_calls or ():
            function = call.function
            output.append(
                OutputFunctionCall(
                    _item_id("fc"),
                    call.id or _item_id("call"),
                    function.name or "",
                    function.arguments or "",
                    "completed",
                )
            )
        reason = _INCOMPLETE.get(choice.finish_reason or "")
    status = "incomplete" if reason else "completed"
    return shell.response(status, output, usage_of(result.usage), reason)


# --- a stream -----------------------------------------------------------------------------


class _Open(msgspec.Struct):
    """The output item being streamed: a message (its one content part) or a function call
    (the chat tool call's index)."""

    index: int
    item: OutputItem
    text: list[str]
    tool_index: int = -1
    # The type of a message's part (text or refusal); None for a function call.
    part: type[Any] | None = None

    def where(self) -> dict[str, Any]:
        return {"item_id": self.item.id, "output_index": self.index, "content_index": 0}

    def added(self) -> ItemAdded:
        return ItemAdded(0, output_index=self.index, item=self.item)


class StreamRenderer:
    """One stream's items as Responses events, each an SSE event named for its type with
    its `sequence_number`; the pipeline's signals end it (a receipt is for peers, which call
    each other through chat completions: ignored)."""

    def __init__(self, shell: Shell) -> None:
        self._shell = shell
        self._native = NativeStream(shell.id, shell.request)
        self._passed_on = False  # an upstream's own Responses events
        self._sequence = 0
        self._output: list[OutputItem] = []
        self._open: _Open | None = None
        self._reason: str | None = None
        self._usage: Usage | None = None
        self._started = False
        # The last snapshot (completed, incomplete or failed), once the stream ended.
        self.final: Response | None = None

    def final_body(self) -> bytes | None:
        """The last snapshot's response, to keep: an upstream's as passed on, or ours."""
        if self._passed_on:
            return self._native.final
        return _encode(self.final) if self.final is not None else None

    def render(self, item: Any) -> bytes:
        if type(item) is NativeEvent:
            self._passed_on = True
            return self._native.render(item)
        if self._passed_on:
            return self._native_signal(item)
        if self._started and type(item) is OpenAIChunk:
            # The hot path, a chunk of text or arguments: no list of lists, no generator.
            out = b""
            for event in item.events():
                for step in self._step(event):
                    out += self._sse(step)
            return out
        events: list[StreamEvent] = []
        if not self._started:
            self._started = True
            events += self._snapshot(Created), self._snapshot(InProgress)
        if isinstance(item, Signal):
            events += self._end(item)
        else:
            for event in _neutral(item):
                events += self._step(event)
        return b"".join(self._sse(event) for event in events)

    def _native_signal(self, signal: Signal) -> bytes:
        """The end of a passed-on stream: the upstream ended it itself, unless it failed."""
        if not isinstance(signal, StreamFailed):
            return b""
        error = _error(signal.error)
        return self._native.failed(error.code, error.message)

    def _sse(self, event: StreamEvent) -> bytes:
        event.sequence_number = self._sequence
        self._sequence += 1
        return _PREFIX[type(event)] + _encode(event) + b"\n\n"

    def _snapshot(self, kind: type[Any], **fields: Any) -> StreamEvent:
        response = self._shell.response(_STATUS[kind], list(self._output), **fields)
        if kind in (Completed, Incomplete, Failed):
            self.final = response
        return kind(0, response=response)  # type: ignore[no-any-return]

    # --- the answer's steps -------------------------------------------------------------

    def _step(self, event: NeutralEvent) -> list[StreamEvent]:
        if getattr(event, "choice", 0):
            return []  # a Responses request has one choice
        if type(event) is TextDelta:
            return self._text(event.text)
        if type(event) is RefusalDelta:
            return self._refusal(event.text)
        if type(event) is ToolCallDelta:
            return [e for fragment in event.calls for e in self._tool(fragment)]
        if type(event) is Finish:
            self._reason = event.reason
            return self._close()
        if type(event) is UsageReport:
            self._usage = event.usage
        return []  # a `Start`: the response was created with the first item

    def _text(self, text: str) -> list[StreamEvent]:
        current = self._open
        events: list[StreamEvent] = []
        if current is None or current.part is not OutputTextPart:
            events = self._message(OutputTextPart(""))
            current = self._current()
        current.text.append(text)
        delta = TextDeltaEvent(
            0, item_id=current.item.id, output_index=current.index, content_index=0, delta=text
        )
        events.append(delta)
        return events

    def _refusal(self, text: str) -> list[StreamEvent]:
        events = self._message(RefusalOutputPart(""))
        current = self._current()
        current.text.append(text)
        events.append(RefusalDeltaEvent(0, **current.where(), delta=text))
        return events

    def _message(self, part: OutputTextPart | RefusalOutputPart) -> list[StreamEvent]:
        """Open a message with `part` unless one of that kind is open already."""
        current = self._open
        if (
            current is not None
            and isinstance(current.item, OutputMessage)
            and type(current.item.content[0]) is type(part)
        ):
            return []
        events = self._close()
        item = OutputMessage(_item_id("msg"), "in_progress", [part])
        opened = self._begin(_Open(len(self._output), item, [], part=type(part)))
        where = opened.where()
        events += [opened.added(), PartAdded(0, **where, part=part)]
        return events

    def _tool(self, fragment: ToolCallFragment) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        current = self._open
        if current is None or current.tool_index != fragment.index:
            events += self._close()
            call_id = fragment.id or _item_id("call")
            name = fragment.name or ""
            item = OutputFunctionCall(_item_id("fc"), call_id, name, "", "in_progress")
            current = self._begin(_Open(len(self._output), item, [], fragment.index))
            events.append(current.added())
        if fragment.arguments:
            current.text.append(fragment.arguments)
            delta = fragment.arguments
            where = {"item_id": current.item.id, "output_index": current.index}
            events.append(ArgumentsDelta(0, **where, delta=delta))
        return events

    def _begin(self, opened: _Open) -> _Open:
        self._open = opened
        self._output.append(opened.item)
        return opened

    def _current(self) -> _Open:
        assert self._open is not None
        return self._open

    def _close(self) -> list[StreamEvent]:
        """Finish the open item: its `.done` events, whole."""
        current, self._open = self._open, None
        if current is None:
            return []
        text = "".join(current.text)
        item = current.item
        index = current.index
        done = _done_item(item, text)
        self._output[index] = done
        events: list[StreamEvent] = []
        if isinstance(done, OutputMessage):
            where = {"item_id": done.id, "output_index": index, "content_index": 0}
            part = done.content[0]
            if isinstance(part, OutputTextPart):
                events.append(TextDone(0, **where, text=text))
            else:
                events.append(RefusalDone(0, **where, refusal=text))
            events.append(PartDone(0, **where, part=part))
        else:
            events.append(ArgumentsDone(0, item_id=done.id, output_index=index, arguments=text))
        events.append(ItemDone(0, output_index=index, item=done))
        return events

    # --- the end ------------------------------------------------------------------------

    def _end(self, signal: Signal) -> list[StreamEvent]:
        if isinstance(signal, ReceiptIssued):
            return []
        events = self._close()
        usage = usage_of(self._usage) if self._usage is not None else None
        if isinstance(signal, StreamFailed):
            events.append(self._snapshot(Failed, usage=usage, error=_error(signal.error)))
            return events
        assert isinstance(signal, StreamEnd)
        reason = _INCOMPLETE.get(self._reason or "")
        if reason:
            events.append(self._snapshot(Incomplete, usage=usage, incomplete=reason))
        else:
            events.append(self._snapshot(Completed, usage=usage))
        return events


# Each event's SSE lines up to its data, by its type: named for the event.
_PREFIX: dict[type[Any], bytes] = {
    kind: b"event: " + str(kind.__struct_config__.tag).encode() + b"\ndata: "
    for kind in StreamEvent.__args__  # type: ignore[attr-defined]
}

# The response's status as each of its snapshots tells it.
_STATUS: dict[type[Any], str] = {
    Created: "in_progress",
    InProgress: "in_progress",
    Completed: "completed",
    Incomplete: "incomplete",
    Failed: "failed",
}


def _neutral(event: Event) -> list[NeutralEvent]:
    if type(event) is OpenAIChunk:
        return event.events()
    return [event]  # type: ignore[list-item]


def _done_item(item: OutputItem, text: str) -> OutputItem:
    if isinstance(item, OutputMessage):
        part = item.content[0]
        done_part: Any = (
            OutputTextPart(text) if isinstance(part, OutputTextPart) else RefusalOutputPart(text)
        )
        return OutputMessage(item.id, "completed", [done_part])
    return OutputFunctionCall(item.id, item.call_id, item.name, text, "completed")


def _error(error: HubError) -> ResponseError:
    """A failure mid-stream, told as chat's stream tells it: what the upstream said, or the
    gateway's own failure."""
    if isinstance(error, UpstreamFailed):
        upstream = error.upstream
        return ResponseError(upstream.code or upstream.type, upstream.message)
    detail = openai_error(error).detail
    return ResponseError(detail.code or detail.type, detail.message)
