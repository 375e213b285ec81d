"""Cost of a request and the batched writer of usage records.

A request's usage record is queued in memory and written with others in one transaction a
few milliseconds later, so that the request path never waits on the disk. A clean shutdown
flushes what is queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from adapters.types import Usage
from node.storage import Store, UsageRecord

log = logging.getLogger("aihub.usage")

MICROS_PER_MILLION_TOKENS = 1_000_000


def cost_micros(usage: Usage, price_in: int, price_out: int) -> int:
    """Integer micro-units, rounded up: prices are micros per million tokens."""
    numerator = usage.prompt_tokens * price_in + usage.completion_tokens * price_out
    return -(-numerator // MICROS_PER_MILLION_TOKENS)


class UsageRecorder:
    def __init__(self, store: Store, *, flush_interval: float = 0.05, batch: int = 512) -> None:
        self.store = store
        self.flush_interval = flush_interval
        self.batch = batch
        self._queue: list[UsageRecord] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-writer")

    def record(self, record: UsageRecord) -> None:
        self._queue.append(record)
        self._idle.clear()
        if len(self._queue) >= self.batch:
            self._wake.set()

    async def flush(self) -> None:
        """Write everything queued so far (used at shutdown and by tests)."""
        while self._queue:
            records, self._queue = self._queue, []
            try:
                await self.store.insert_usage(records)
            except Exception:
                # Keep the records for the next attempt rather than lose them.
                self._queue = records + self._queue
                raise
        self._idle.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_interval)
            self._wake.clear()
            try:
                await self.flush()
            except Exception:
                log.exception("writing usage records failed; will retry")
                await asyncio.sleep(1)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()
