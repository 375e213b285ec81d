"""What every translated upstream stream shares: the usage it reports when it ends, and the
charge of one cut short.

A stream is charged even when it does not finish (an upstream error, a client gone away, a
cut connection): by the upstream's own counts so far, but never fewer output tokens than the
estimate of what was written, because an upstream that stops counting must not make the
answer free. Each adapter's stream subclasses `CountedStream`, records what it writes in
`_written` and the upstream's counts in `_prompt_count` / `_completion_count`, and yields its
events from `_events()`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

from adapters.events import Event
from adapters.http import UpstreamResponse
from adapters.tokens import estimate_text_tokens, usage_or_estimate
from adapters.types import ChatCall, Upstream, Usage


class CountedStream(ABC):
    """An upstream's stream as neutral events, with `usage` set once it ends, however it
    ends."""

    def __init__(self, call: ChatCall, upstream: Upstream, response: UpstreamResponse) -> None:
        self.usage: Usage | None = None
        self.usage_estimated = False
        self.receipt: bytes | None = None
        self._call = call
        self._upstream = upstream
        self._response = response
        self._created = int(time.time())
        # What the model wrote so far, for an estimate if the stream is cut short.
        self._written: list[str] = []
        self._prompt_count: int | None = None
        self._completion_count: int | None = None

    async def __aiter__(self) -> AsyncIterator[Event]:
        try:
            async for event in self._stream():
                yield event
        finally:
            if self.usage is None:
                self._charge_what_arrived()

    def _stream(self) -> AsyncIterator[Event]:
        return self._events()

    @abstractmethod
    def _events(self) -> AsyncIterator[Event]:
        """The provider's events, translated: each adapter's stream writes its own."""

    def _completion_so_far(self, written: str) -> int:
        """The output tokens of a stream cut short: the upstream's count so far, never less
        than the estimate of what was written."""
        return max(self._completion_count or 0, estimate_text_tokens(written))

    def _charge_what_arrived(self) -> None:
        written = "".join(self._written)
        completion = self._completion_so_far(written)
        self.usage, _ = usage_or_estimate(self._prompt_count, completion, self._call, written)
        self.usage_estimated = True
