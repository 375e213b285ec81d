"""The one SQLite connection of a store, aiosqlite's thread that owns it, and the one way to
run work on it: `await db.atomic(work)`, where `work(sqlite3.Connection)` runs whole, in a
transaction.

Why aiosqlite's private `Connection._execute`: its public calls cost a round trip to its thread
each (a statement, then closing its cursor), and a transaction of several statements would be
several round trips with other coroutines' statements able to land in between; `_execute(fn,
*args)` queues one function to its thread and is the one way to hand it a whole unit of work.
It has kept that name, signature and behaviour from 0.17 to 0.22 (the version is pinned below
1 in pyproject.toml), and `tests/test_storage_connection.py` pins what we rely on: the function
runs on aiosqlite's thread, its value and its exception come back, and it runs to its end when
its caller is cancelled. A thread of our own doing the same was measured at the same cost per
call (10,000 `ping`s and one-record `write_batch`es, on a loaded 2-core machine: within noise
either way), so the stack's library stays.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import aiosqlite

T = TypeVar("T")
Work = Callable[[sqlite3.Connection], T]

# Settings of each connection (journal_mode=WAL is the file's own, set once). NORMAL: a commit
# survives the process crashing (not the machine) without an fsync; the default, FULL, fsyncs.
_PRAGMAS = ("synchronous=NORMAL", "foreign_keys=ON")
# Another writer holds the database (the primary result codes, under any extended code).
_BUSY = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


async def _run(connection: aiosqlite.Connection, work: Work[T]) -> T:
    """`work` on aiosqlite's thread, given the sqlite3 connection that thread owns (see the
    module's docstring for why `_execute`)."""
    return await connection._execute(work, connection._conn)


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

    def __init__(self, path: Path, connection: aiosqlite.Connection) -> None:
        self.path = path
        self._connection: aiosqlite.Connection | None = connection
        # The event loop thread's own connection, for `atomic(..., inline=True)`.
        self._inline: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: Path, prepare: Callable[[sqlite3.Connection], None]) -> Database:
        """Connect (in WAL mode) and run `prepare` (the migrations) before any other work."""
        connection = await aiosqlite.connect(path, isolation_level=None)

        def connect(db: sqlite3.Connection) -> None:
            for pragma in ("journal_mode=WAL", *_PRAGMAS, "busy_timeout=10000"):
                db.execute(f"PRAGMA {pragma}")
            prepare(db)

        try:
            await _run(connection, connect)
        except BaseException:
            await connection.close()
            raise
        return cls(path, connection)

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()
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
        return await _run(connection, lambda db: _in_transaction(db, work, begin))

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
