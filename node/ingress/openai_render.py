"""Adapters' results and stream events, in OpenAI's chat format.

A result or chunk that carries an OpenAI-compatible upstream's bytes (`wire`, `OpenAIChunk`) is
sent as it came: the fast path, no decode and no encode. Everything else is encoded from its
typed form: a result's `ChatCompletion`/`EmbeddingList`, and each neutral event as one
`chat.completion.chunk` SSE event, the same bytes the adapters wrote before the seam was typed.
"""

from __future__ import annotations

import msgspec

from adapters.events import (
    Event,
    Finish,
    OpenAIChunk,
    RefusalDelta,
    Start,
    TextDelta,
    ToolCallDelta,
    ToolCallFragment,
    UsageReport,
)
from adapters.types import (
    ChatCompletionChunk,
    ChatResult,
    ChunkChoice,
    Delta,
    EmbedResult,
    FunctionCall,
    ToolCall,
    Usage,
    sse_event,
)

_encode = msgspec.json.Encoder().encode
_STARTED = Delta(role="assistant", content="")
_FINISHED = Delta()


def result_body(result: ChatResult | EmbedResult) -> bytes:
    """The JSON body of a complete answer."""
    if result.wire is not None:
        return result.wire
    if isinstance(result, ChatResult):
        return _encode(result.chat_completion())
    return _encode(result.embedding_list())


class ChunkRenderer:
    """One stream's events as OpenAI's chunk SSE events, one chunk per event.

    Stateful per stream: every chunk repeats the message's id, model and creation time, which
    only the first `Start` says.
    """

    def __init__(self) -> None:
        self._id = ""
        self._model = ""
        self._created = 0
        self._named = False

    def render(self, event: Event) -> bytes:
        if type(event) is OpenAIChunk:
            return event.sse
        if type(event) is TextDelta:
            return self._chunk(event.choice, Delta(content=event.text))
        if type(event) is ToolCallDelta:
            calls = [_tool_call(fragment) for fragment in event.calls]
            return self._chunk(event.choice, Delta(tool_calls=calls))
        if type(event) is Start:
            if not self._named:
                self._id, self._model, self._created = event.id, event.model, event.created
                self._named = True
            return self._chunk(event.choice, _STARTED)
        if type(event) is Finish:
            return self._chunk(event.choice, _FINISHED, event.reason)
        if type(event) is RefusalDelta:
            return self._chunk(event.choice, Delta(refusal=event.text))
        if type(event) is UsageReport:
            return self._envelope([], event.usage)
        raise TypeError(f"not a stream event: {event!r}")

    def _chunk(self, choice: int, delta: Delta, finish: str | None = None) -> bytes:
        return self._envelope([ChunkChoice(choice, delta, finish)])

    def _envelope(self, choices: list[ChunkChoice], usage: Usage | None = None) -> bytes:
        chunk = ChatCompletionChunk(self._id, self._model, self._created, choices, usage)
        return sse_event(_encode(chunk))


def _tool_call(fragment: ToolCallFragment) -> ToolCall:
    function = FunctionCall(name=fragment.name, arguments=fragment.arguments)
    return ToolCall(function, id=fragment.id, index=fragment.index)
