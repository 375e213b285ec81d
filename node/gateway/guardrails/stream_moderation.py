"""A streamed answer through the profile's output moderation deployments.

The text streams as it comes (through the in-process checks' hold-back window, when the
profile has any); what ends the answer (each choice's finish, the usage, a peer's receipt,
the stream's end) is held until the whole text, as the client was sent it, has been
assessed, once the upstream has finished. A clean answer then ends as it would have; a
flagged one (or, failing closed, one the deployment did not assess in time) ends with the
API's stream error event instead (OpenAI's `error` event, Anthropic's `event: error`,
Responses' `response.failed`), which the official SDKs raise, so that no client takes it for a
complete answer.

Why at the end and not piece by piece before each is sent: a moderation deployment is a
remote call of up to its `timeout`, which holding every piece for would add to the time to
first byte and again between pieces, and a moderator judges a whole answer better than its
fragments. The price: what a flagged answer said before its end was shown; a client that
must show nothing unmoderated asks without `stream`, where a flagged answer is never sent.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

from adapters.events import Finish, OpenAIChunk, TextDelta, UsageReport
from adapters.types import UpstreamError
from node.errors import HubError, UpstreamFailed

# Past this many characters of a choice's text, the rest is not kept for the moderator (what
# it reads is bounded as the answer's size is not).
MAX_CHARS = 1 << 20


def _events(item: Any) -> list[Any]:
    return item.events() if isinstance(item, OpenAIChunk) else [item]


def _ends(events: list[Any]) -> bool:
    """Whether these events end a choice or tell the stream's usage: held from there on."""
    return any(isinstance(event, Finish | UsageReport) for event in events)


class _Texts:
    """Each choice's text so far, bounded."""

    def __init__(self) -> None:
        self.parts: dict[int, list[str]] = {}
        self.sizes: dict[int, int] = {}

    def add(self, events: list[Any]) -> None:
        for event in events:
            if not isinstance(event, TextDelta) or not event.text:
                continue
            size = self.sizes.get(event.choice, 0)
            if size >= MAX_CHARS:
                continue
            self.parts.setdefault(event.choice, []).append(event.text[: MAX_CHARS - size])
            self.sizes[event.choice] = size + len(event.text)

    def whole(self) -> list[str]:
        return ["".join(self.parts[choice]) for choice in sorted(self.parts)]


async def moderated_stream(
    items: AsyncGenerator[Any, None],
    judge: Callable[[list[str]], Awaitable[HubError | None]],
) -> AsyncGenerator[Any, None]:
    """The stream's items, its ending held until `judge` (the moderation deployments, on each
    choice's whole text) has said nothing against it; what it says against it ends the
    stream in its place."""
    # The pipeline imports the guardrails: its signals are imported when a stream is read.
    from node.gateway.pipeline import ReceiptIssued, StreamEnd, StreamFailed

    texts = _Texts()
    held: list[Any] = []
    withheld: Any = None
    async with aclosing(items):
        async for item in items:
            if withheld is not None:
                continue  # the relay's end, read so that it settles (`books.withheld`)
            if isinstance(item, StreamFailed):
                # The upstream broke: the client is told so, after what was held.
                for kept in held:
                    yield kept
                held = []
                yield item
                continue
            if isinstance(item, StreamEnd):
                blocked = await judge(texts.whole())
                for kept in held:
                    # A peer's receipt is its provider's record of what it paid for: kept.
                    if blocked is None or isinstance(kept, ReceiptIssued):
                        yield kept
                held = []
                if blocked is None:
                    yield item
                else:
                    withheld = StreamFailed(blocked)
                continue
            if isinstance(item, ReceiptIssued):
                held.append(item)
                continue
            try:
                events = _events(item)
            except UpstreamError as exc:
                # A chunk no parser reads: the stream ends as the relay ends a broken one.
                for kept in held:
                    yield kept
                yield StreamFailed(UpstreamFailed(exc))
                return
            texts.add(events)
            if held or _ends(events):
                held.append(item)
            else:
                yield item
    if withheld is not None:
        # Once the relay has settled the request: the client is told last.
        yield withheld
