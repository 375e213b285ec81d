"""Cost of a request and the batched writer of usage records, charges and audit events.

A finished request's usage record and the charge of its budget reservations are appended
to this process's journal (`node.gateway.journal`: one write(2), no fsync), queued in memory and
written with others in one transaction a few milliseconds later, so that the request path
never waits on the database and a crash loses none of them. A clean shutdown flushes what is
queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from adapters.types import Usage
from node.gateway.journal import UNAPPLIABLE, Journal, apply, skipped_event
from node.storage.base import Store
from node.storage.records import AuditEvent, Charge, SpendRow, StoreUnavailable

log = logging.getLogger("aihub.usage")

MICROS_PER_MILLION_TOKENS = 1_000_000
# How far an upstream's prompt count may pass the request's worst case (already a token per
# byte) before it is clamped: twice it, plus what providers add unseen (chat templates, the
# system prompt of tool use, image tiles an older estimate did not count).
PROMPT_FACTOR = 2
PROMPT_SLACK = 1024


def cost_micros(usage: Usage, price_in: int, price_out: int) -> int:
    """Integer micro-units, rounded up: prices are micros per million tokens."""
    numerator = usage.prompt_tokens * price_in + usage.completion_tokens * price_out
    return -(-numerator // MICROS_PER_MILLION_TOKENS)


def _bounded(count: object, most: int) -> tuple[int, bool]:
    """A count within [0, most] (anything that is not an int counts as the most it could be),
    and whether it had to be changed."""
    if type(count) is not int:
        return most, True
    bounded = min(max(count, 0), most)
    return bounded, bounded != count


def clamp_usage(usage: Usage, worst: Usage) -> tuple[Usage, bool]:
    """Token counts an upstream or peer reported, held to what the request could have used:
    completion tokens to its output bound (`max_tokens` or the model's limit, as reserved),
    prompt tokens to its worst case with a margin; the total is always their sum. Whether any
    count had to be changed (the record says so: the counts are untrusted)."""
    prompt, completion = usage.prompt_tokens, usage.completion_tokens
    most_prompt = worst.prompt_tokens * PROMPT_FACTOR + PROMPT_SLACK
    if (
        type(prompt) is int
        and type(completion) is int
        and 0 <= prompt <= most_prompt
        and 0 <= completion <= worst.completion_tokens
    ):  # the usual case, on every request: no new objects
        if usage.total_tokens == prompt + completion:
            return usage, False
        return Usage(prompt, completion, prompt + completion), False
    prompt, prompt_clamped = _bounded(prompt, most_prompt)
    completion, completion_clamped = _bounded(completion, worst.completion_tokens)
    return Usage(prompt, completion, prompt + completion), prompt_clamped or completion_clamped


# A listener hears of charges written, with the spend rows of the scopes they settled as the
# batch's own transaction read them (None when it did not: the listener reads them itself).
FlushListener = Callable[[list[Charge], list[SpendRow] | None], Awaitable[None]]


class UsageRecorder:
    def __init__(
        self,
        store: Store,
        journal: Journal | None = None,
        *,
        flush_interval: float = 0.05,
        batch: int = 512,
    ) -> None:
        self.store = store
        self.journal = journal
        self.flush_interval = flush_interval
        self.batch = batch
        self.listeners: list[FlushListener] = []
        self._charges: list[Charge] = []
        self._events: list[AuditEvent] = []
        self._wake = asyncio.Event()
        self._due: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-writer")

    def record(self, charge: Charge) -> None:
        if self.journal is not None:
            self.journal.append(charge)
        self._charges.append(charge)
        self._schedule()

    def audit(self, event: AuditEvent) -> None:
        self._events.append(event)
        self._schedule()

    def _schedule(self) -> None:
        """Flush `flush_interval` after the first record queued, or at once with a full batch:
        an idle node never wakes for nothing."""
        if len(self._charges) >= self.batch:
            self._wake.set()
        elif self._due is None:
            self._due = asyncio.get_running_loop().call_later(self.flush_interval, self._wake.set)

    async def notify(self, charges: list[Charge], spend: list[SpendRow] | None = None) -> None:
        """Tell the listeners of charges written (and the spend they settled, if read)."""
        for listener in self.listeners:
            try:
                await listener(charges, spend)
            except Exception:
                log.exception("a usage listener failed")

    async def flush(self) -> None:
        """Write everything queued so far (used at shutdown and by tests)."""
        async with self._lock:
            while self._charges or self._events:
                await self._write_queued()

    async def _write_next(self) -> None:
        """Write what is queued now, as one batch. What comes in meanwhile waits for a timer
        of its own (`_schedule`): writing on while records kept coming made a busy node
        write a batch per write's duration rather than per `flush_interval` (80 batches for
        300 sequential requests, each a transaction with its WAL frames and file locks,
        and the budget alerts' read of the batch's spend)."""
        async with self._lock:
            if self._charges or self._events:
                await self._write_queued()

    async def _write_queued(self) -> None:
        if self.journal is not None:
            # No await until the swap: a segment it seals holds nothing newer than this batch.
            self.journal.seal()
        charges, self._charges = self._charges, []
        events, self._events = self._events, []
        try:
            spend = await self._write(charges, events)
        except Exception:
            # Keep them for the next attempt rather than lose them.
            self._charges[:0] = charges
            self._events[:0] = events
            raise
        if self.journal is not None:
            self.journal.committed()
        await self.notify(charges, spend)

    async def _write(
        self, charges: list[Charge], events: list[AuditEvent]
    ) -> list[SpendRow] | None:
        """One batch, and the spend it settled; a record the database refuses (not a
        database that is busy) is skipped and reported, so that one bad record never stops
        every usage write after it (the spend is not read then: None)."""
        try:
            return await self.store.usage.write_batch(charges, events)
        except UNAPPLIABLE:
            pass
        refused = await apply(self.store, charges)
        for charge, reason in refused:
            log.error("skipped usage record %s: %s", charge.record.request_id, reason)
        if refused:
            events = [*events, skipped_event("usage-writer", refused, 0)]
        await self.store.usage.write_batch([], events)
        return None

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._due is not None:
                self._due.cancel()
                self._due = None
            try:
                await self._write_next()
            except StoreUnavailable as exc:  # the journal keeps them meanwhile
                log.warning("usage records wait for the database: %s", exc)
                await asyncio.sleep(1)
                self._wake.set()
            except Exception:
                log.exception("writing usage records failed; will retry")
                await asyncio.sleep(1)
                self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()
        if self.journal is not None:
            self.journal.close()
