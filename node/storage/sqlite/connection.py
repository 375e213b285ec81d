"""The one SQLite connection of a store, the thread that owns it, and the one way to run work
on it: `await db.atomic(work)`, where `work(sqlite3.Connection)` runs whole, in a transaction.

Why our own thread and not aiosqlite (which this replaced): aiosqlite's public calls cost a
round trip to its thread each (a statement, then closing its cursor); the one way to hand it
a whole unit of work is its private `_execute` queue. A thread of our own that owns the
connection does the same in a few lines, with no private API, at the same cost: a round trip
is one queue put and one `call_soon_threadsafe` either way. Measured on the shared 2-core
development machine (loaded by other work, so noisy), 10,000 calls each on a fresh database,
per call, three runs: `ping` 101/203/282 us through aiosqlite's `_execute`, 120/236/456 us
here; a one-record `write_batch` 202/353/517 us there, 185/361/570 us here. The one thing
added per call is the BEGIN/COMMIT of a read transaction, 1.5 us measured alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
Work = Callable[[sqlite3.Connection], T]

# Settings of each connection (journal_mode=WAL is the file's own, set once). NORMAL: a commit
# survives the process crashing (not the machine) without an fsync; the default, FULL, fsyncs.
_PRAGMAS = ("synchronous=NORMAL", "foreign_keys=ON")
# Another writer holds the database (the primary result codes, under any extended code).
_BUSY = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[object]", Callable[[], object]]


def _serve_jobs(jobs: queue.SimpleQueue[_Job | None]) -> None:
    """The store's thread: run jobs one after another, in the order queued, until None. A
    job whose caller was cancelled still runs to its end (a transaction commits or rolls
    back whole); only its answer is dropped. (`bench/profile.py` knows this function's name:
    waiting here is idle time.)"""
    while (job := jobs.get()) is not None:
        loop, future, call = job
        try:
            result, error = call(), None
        except BaseException as exc:
            result, error = None, exc
        # A closed loop (RuntimeError) has nobody waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, future, result, error)


class _Worker:
    """The thread that owns a connection, and the queue of jobs it runs."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        # A daemon: a store left open must not keep the process from exiting.
        self._thread = threading.Thread(
            target=_serve_jobs, args=(self._jobs,), name="sqlite", daemon=True
        )
        self._thread.start()

    async def submit(self, call: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, future, call))  # type: ignore[arg-type]
        return await future

    def stop(self) -> None:
        self._jobs.put(None)


def _settle(future: asyncio.Future[object], result: object, error: BaseException | None) -> None:
    if future.done():  # cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _in_transaction(db: sqlite3.Connection, work: Work[T], begin: str) -> T:
    """`work` in a transaction on `db`: all of its statements, or none."""
    db.execute(begin)
    try:
        result = work(db)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return result


class Database:
    """One SQLite file: its connection, owned by one thread, shared by every coroutine of the
    process. Work runs whole on that thread, so no coroutine's statement ever lands inside
    another's transaction, and no lock is needed on the event loop's side."""

    def __init__(self, path: Path, worker: _Worker, connection: sqlite3.Connection) -> None:
        self.path = path
        self._worker = worker
        self._connection: sqlite3.Connection | None = connection
        # The event loop thread's own connection, for `atomic(..., inline=True)`.
        self._inline: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: Path, prepare: Callable[[sqlite3.Connection], None]) -> Database:
        """Connect (in WAL mode) and run `prepare` (the migrations) before any other work."""
        worker = _Worker()

        def connect() -> sqlite3.Connection:
            db = sqlite3.connect(path, isolation_level=None)
            try:
                for pragma in ("journal_mode=WAL", *_PRAGMAS, "busy_timeout=10000"):
                    db.execute(f"PRAGMA {pragma}")
                prepare(db)
            except BaseException:
                db.close()
                raise
            return db

        try:
            connection = await worker.submit(connect)
        except BaseException:
            worker.stop()
            raise
        return cls(path, worker, connection)

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                await self._worker.submit(connection.close)
            finally:
                self._worker.stop()
        if self._inline is not None:
            self._inline.close()
            self._inline = None

    async def atomic(self, work: Work[T], *, write: bool = True, inline: bool = False) -> T:
        """Run `work` whole, in one transaction: all of its statements, or none if it raises
        (its exception reaches the caller). `write`: a write transaction (BEGIN IMMEDIATE,
        waiting up to busy_timeout for another writer); else a read transaction, one
        snapshot for all of its statements. A caller cancelled meanwhile leaves the work to
        finish (or roll back) on its own.

        `inline`, for short writes on the request path: run at once on the event loop's
        thread, through a second connection, when the database is free; on the store's
        thread like any other when another writer (another coroutine's transaction, another
        worker process) holds it. Handing work to a thread and back costs two thread
        wake-ups, which on a busy core is most of the federated hop's added latency; the
        statements themselves take tens of microseconds (WAL, synchronous=NORMAL: no fsync
        at commit). The second connection never waits for the lock (busy_timeout 0) and
        never checkpoints (the checkpoint's fsync is the thread's connection's to do), so the
        loop is never blocked on the disk.
        """
        begin = "BEGIN IMMEDIATE" if write else "BEGIN DEFERRED"
        if inline:
            try:
                return _in_transaction(self._inline_connection(), work, begin)
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF not in _BUSY:
                    raise
        connection = self._connection
        if connection is None:
            raise sqlite3.ProgrammingError("the store is closed")
        return await self._worker.submit(lambda: _in_transaction(connection, work, begin))

    def _inline_connection(self) -> sqlite3.Connection:
        if self._inline is None:
            inline = sqlite3.connect(self.path, isolation_level=None)
            for pragma in (*_PRAGMAS, "busy_timeout=0", "wal_autocheckpoint=0"):
                inline.execute(f"PRAGMA {pragma}")
            self._inline = inline
        return self._inline

    # Shorthands for one statement, through the same door.

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        """Run one write statement; the number of rows it changed."""
        return await self.atomic(lambda db: db.execute(sql, params).rowcount)

    async def execute_many(self, sql: str, rows: Iterable[Sequence[object]]) -> int:
        """Run one write statement for each of `rows`, all or none; the rows changed."""
        return await self.atomic(lambda db: db.executemany(sql, rows).rowcount)

    async def fetchall(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        return await self.atomic(lambda db: db.execute(sql, params).fetchall(), write=False)

    async def fetchone(self, sql: str, params: Sequence[object] = ()) -> tuple | None:
        return await self.atomic(lambda db: db.execute(sql, params).fetchone(), write=False)
