"""Writes that requests in flight ask for at about the same time, done together in one
transaction.

On the provider's side of the hop, each peer request costs a transaction or two on its path
(its nonce's claim, its receipt). Two ways of gathering them, by what a transaction costs:

- `TurnBatch`: those asked for in the same turn of the event loop (requests that came in
  together). The first waits that one turn; worth it where the transaction's own part is large
  (a receipt: the chain's head read, the usage tables written), not where it is one short
  statement, whose saving that turn's wait costs again.
- `GroupCommit`: one asked for alone is written at once, by its requester; those asked for
  while a write is in flight (a PostgreSQL round trip, or SQLite's thread when another writer
  holds the database) are written together next. Nothing is added to a request alone.

Both keep what the receipts' batch taught:

- a batch of several is written by a task of its own, which the requesters only wait for: one
  cancelled mid-write (its peer hung up) stops neither the write nor the others' answers;
- a batch that fails is written again one item at a time, so that one bad item costs no other
  item its answer (the batch's transaction rolled back whole, so nothing of it was kept);
- an item left without an answer (the task cancelled at the loop's end) gets an error, so that
  no one waits forever.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

# The write of a batch: one result per item, in the items' order, all in one transaction
# (raising keeps none of them).
Write = Callable[[Sequence[Item]], Awaitable[Sequence[Result]]]


class _Batches(Generic[Item, Result]):
    """Batches handed to tasks of their own, and written whole or one by one."""

    def __init__(self, write: Write[Item, Result], name: str) -> None:
        self._write = write
        self._name = name
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._writing: set[asyncio.Task[None]] = set()

    def _hand_off(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> asyncio.Task[None]:
        task = asyncio.create_task(self._write_all(batch), name=self._name)
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)
        return task

    async def _write_all(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            await self._write_batch(batch)
        finally:
            for _, done in batch:
                if not done.done():
                    done.set_exception(RuntimeError(f"{self._name}: not written"))

    async def _write_batch(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            results = await self._write([item for item, _ in batch])
        except Exception as exc:
            if len(batch) > 1:
                for one in batch:
                    await self._write_batch([one])
            elif not batch[0][1].done():
                batch[0][1].set_exception(exc)
            return
        for (_, done), result in zip(batch, results, strict=True):
            if not done.done():  # a requester that went away: its item is written all the same
                done.set_result(result)

    async def settle(self) -> None:
        """Wait for the batches being written (at shutdown, and in tests); an item written
        alone is its requester's own write, which that requester awaits."""
        while self._writing:
            await asyncio.wait(list(self._writing))


class TurnBatch(_Batches[Item, Result]):
    """The items asked for in one turn of the event loop, in one transaction.

    An item that no other joined in its turn (a request alone, as at concurrency 1) is
    written by its requester itself, without a task: the task and the shield around it cost
    15-25 µs a receipt (`bench/turn_batch.py`) and three turns of the loop on the answer's
    path. That is safe because a write of the store runs to its end when its caller is
    cancelled (both backends' `atomic`), which is all the task was for when there is no one
    else's item to finish."""

    async def ask(self, item: Item) -> Result:
        """`item` written with the others asked for in this turn; its own result. The first
        to ask waits that one turn (the others ask meanwhile), then writes its item alone or
        hands them all to a task of their own; the others wait for their own result."""
        done: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((item, done))
        if len(self._pending) > 1:  # the first of this turn's is gathering them: ours too
            return await done
        task = await self._turn()
        if task is None:  # alone in its turn
            return (await self._write([item]))[0]
        await asyncio.shield(task)
        return done.result()

    async def _turn(self) -> asyncio.Task[None] | None:
        """The task writing this turn's items, or None if the first requester's is alone
        (it writes it itself)."""
        try:
            await asyncio.sleep(0)
        except BaseException:
            # The first requester cancelled during its turn: the items gathered are someone
            # else's too, and its own is written all the same.
            self._hand_off(self._gathered())
            raise
        batch = self._gathered()
        return None if len(batch) == 1 else self._hand_off(batch)

    def _gathered(self) -> list[tuple[Item, asyncio.Future[Result]]]:
        batch, self._pending = self._pending, []
        return batch


class GroupCommit(_Batches[Item, Result]):
    """An item asked for alone, written at once by its requester; the items asked for while
    that write is in flight, together by a task of their own once it is done, and so on."""

    def __init__(self, write: Write[Item, Result], name: str) -> None:
        super().__init__(write, name)
        self._busy = False  # a write is in flight: the next items wait for the next batch

    async def ask(self, item: Item) -> Result:
        """`item` written, alone or with the others asked for while a write was in flight;
        its own result."""
        if self._busy:
            done: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
            self._pending.append((item, done))
            return await done
        self._busy = True
        try:
            # Our own write: cancelled, it costs no one else anything (the others wait for
            # the batch after it, written by a task).
            return (await self._write([item]))[0]
        finally:
            self._next()

    def _next(self, _: object = None) -> None:
        if not self._pending:
            self._busy = False
            return
        batch, self._pending = self._pending, []
        self._hand_off(batch).add_done_callback(self._next)
