"""Output checks on a streamed answer: a bounded hold-back window per choice.

The last `hold_back` characters of each choice's text are held until more text comes, so that
what spans chunks (an email split over three deltas) is found whole before any of it is sent;
a finding that reaches into the window is held back whole. What is older than the window is
checked, redacted and sent. An entity longer than the window may be sent in part before it
is recognisable: the window bounds both the delay and what can be caught.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

from adapters.events import Finish, OpenAIChunk, Start, TextDelta, ToolCallDelta
from adapters.types import UpstreamError
from node.errors import UpstreamFailed
from node.gateway.guardrails.checks import Built
from node.gateway.guardrails.findings import Finding, Span, placeholder


def redact_spans(text: str, spans: list[Span]) -> str:
    """`text` with each span replaced by its placeholder (overlaps: the first one wins)."""
    out, position = [], 0
    for span in sorted(spans, key=lambda s: (s.start, -s.end)):
        if span.start < position or span.end <= span.start:
            continue
        out += [text[position : span.start], placeholder(span.kind)]
        position = span.end
    out.append(text[position:])
    return "".join(out)


class HoldBack:
    """One choice's text, held back by a window and redacted as it leaves it."""

    def __init__(self, checks: list[Built], window: int, seen: Callable[[Finding], None]):
        self.checks = checks
        self.window = window
        # The checks run once this much text is past the window, not on every delta (a
        # delta is a few characters; each run reads the whole window).
        self.step = max(1, window // 4)
        self.pending = ""
        self._seen = seen

    def _spans(self, text: str) -> dict[str, list[Span]]:
        found: dict[str, list[Span]] = {}
        for check in self.checks:
            assert check.detector is not None
            spans = check.detector.find(text)
            if spans:
                found[check.name] = spans
        return found

    def _emit(self, cut: int, found: dict[str, list[Span]]) -> str:
        text, self.pending = self.pending[:cut], self.pending[cut:]
        redacted: list[Span] = []
        for check in self.checks:
            spans = [s for s in found.get(check.name, []) if s.end <= cut]
            if not spans:
                continue
            self._seen(Finding.of(check.name, check.action, spans))
            if check.action == "redact":
                redacted += spans
        return redact_spans(text, redacted)

    def feed(self, text: str) -> str:
        """Take a delta; what may be sent now (maybe nothing)."""
        self.pending += text
        cut = len(self.pending) - self.window
        if cut < self.step:
            return ""
        found = self._spans(self.pending)
        for spans in found.values():
            for span in spans:
                if span.start < cut < span.end:
                    cut = span.start  # a finding reaching into the window waits whole
        return self._emit(cut, found) if cut > 0 else ""

    def flush(self) -> str:
        if not self.pending:
            return ""
        return self._emit(len(self.pending), self._spans(self.pending))


async def guarded(
    items: AsyncGenerator[Any, None],
    checks: list[Built],
    window: int,
    seen: Callable[[Finding], None],
) -> AsyncGenerator[Any, None]:
    """The stream's items with each choice's text passed through its hold-back window; an
    OpenAI upstream's passed-on chunks are read as their neutral events (the ingress renders
    those); a choice's finish, and the stream's usage and signals, come after the text held
    before them."""
    held: dict[int, HoldBack] = {}

    def flushed(choice: int | None) -> list[TextDelta]:
        out = []
        for index, hold in held.items():
            if choice is None or index == choice:
                text = hold.flush()
                if text:
                    out.append(TextDelta(text, index))
        return out

    async with aclosing(items):
        async for item in items:
            try:
                events = item.events() if isinstance(item, OpenAIChunk) else (item,)
            except UpstreamError as exc:
                # A chunk no parser reads: the stream ends as the relay ends a broken one.
                from node.gateway.pipeline import StreamFailed  # the pipeline imports us

                for delta in flushed(None):
                    yield delta
                yield StreamFailed(UpstreamFailed(exc))
                return
            for event in events:
                if isinstance(event, TextDelta):
                    hold = held.setdefault(event.choice, HoldBack(checks, window, seen))
                    text = hold.feed(event.text)
                    if text:
                        yield TextDelta(text, event.choice)
                    continue
                if not isinstance(event, Start | ToolCallDelta):
                    # A choice's end ends its text; the stream's own items (its usage, the
                    # receipt, its end or failure) come after every choice's text.
                    for delta in flushed(event.choice if isinstance(event, Finish) else None):
                        yield delta
                yield event
