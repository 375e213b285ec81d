"""The store's one transaction mechanism (`Database.atomic`): work runs whole or not at all, on
the store's thread or, inline, on the event loop's; its value and its exception reach the
caller; a cancelled caller's work still finishes. These pin what the store relies on in
aiosqlite's private `Connection._execute` (see node/storage/sqlite/connection.py): a version of
aiosqlite that changed it fails here."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from node.storage.sqlite.connection import Database


def _schema(db: sqlite3.Connection) -> None:
    db.execute("CREATE TABLE IF NOT EXISTS t (v INTEGER)")


async def _rows(db: Database) -> list[int]:
    return [row[0] for row in await db.fetchall("SELECT v FROM t ORDER BY v")]


class Boom(Exception):
    pass


@pytest.mark.parametrize("inline", [False, True])
def test_work_that_raises_leaves_nothing_written(tmp_path: Path, inline: bool) -> None:
    def half(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO t VALUES (1)")
        raise Boom("after the first statement")

    async def run() -> None:
        db = await Database.open(tmp_path / "db", _schema)
        try:
            with pytest.raises(Boom):
                await db.atomic(half, inline=inline)
            assert await _rows(db) == []
            # The connection is usable again: the failed transaction was rolled back.
            await db.atomic(lambda c: c.execute("INSERT INTO t VALUES (2)"), inline=inline)
            assert await _rows(db) == [2]
        finally:
            await db.close()

    asyncio.run(run())


@pytest.mark.parametrize("inline", [False, True])
def test_work_answers_its_value_from_its_thread(tmp_path: Path, inline: bool) -> None:
    async def run() -> None:
        db = await Database.open(tmp_path / "db", _schema)
        try:
            name = await db.atomic(lambda c: threading.current_thread().name, inline=inline)
            # Inline: on the event loop's thread; else on the thread that owns the connection.
            assert (name == threading.current_thread().name) is inline
        finally:
            await db.close()

    asyncio.run(run())


def test_a_busy_database_sends_inline_work_to_the_thread(tmp_path: Path) -> None:
    """Another writer holds the lock: the inline attempt gives way at once and the work waits
    on the store's thread (busy_timeout) until the lock is free."""

    async def run() -> None:
        db = await Database.open(tmp_path / "db", _schema)
        other = sqlite3.connect(tmp_path / "db", isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            where = asyncio.create_task(
                db.atomic(
                    lambda c: (
                        c.execute("INSERT INTO t VALUES (1)"),
                        threading.current_thread().name,
                    )[1],
                    inline=True,
                )
            )
            await asyncio.sleep(0.2)
            assert not where.done()
            other.execute("COMMIT")
            assert await asyncio.wait_for(where, 10) != threading.current_thread().name
            assert await _rows(db) == [1]
        finally:
            other.close()
            await db.close()

    asyncio.run(run())


def test_a_cancelled_caller_leaves_its_work_to_finish(tmp_path: Path) -> None:
    started, release = threading.Event(), threading.Event()

    def slow(db: sqlite3.Connection) -> None:
        started.set()
        release.wait(10)
        db.execute("INSERT INTO t VALUES (1)")
        db.execute("INSERT INTO t VALUES (2)")

    async def run() -> None:
        db = await Database.open(tmp_path / "db", _schema)
        try:
            task = asyncio.create_task(db.atomic(slow))
            assert await asyncio.to_thread(started.wait, 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            release.set()
            # Jobs run in order: this read comes after the cancelled write, committed whole.
            assert await _rows(db) == [1, 2]
        finally:
            await db.close()

    asyncio.run(run())


def test_a_closed_database_refuses_work(tmp_path: Path) -> None:
    async def run() -> None:
        db = await Database.open(tmp_path / "db", _schema)
        await db.close()
        with pytest.raises(sqlite3.ProgrammingError):
            await db.fetchone("SELECT 1")

    asyncio.run(run())


def test_aiosqlite_runs_a_queued_function_on_its_own_thread() -> None:
    """The one private call the store makes, `aiosqlite.Connection._execute(fn, *args)`: `fn`
    runs on aiosqlite's thread with the arguments given, and its value and its exception come
    back to the awaiting coroutine."""
    import aiosqlite

    async def run() -> None:
        connection = await aiosqlite.connect(":memory:", isolation_level=None)
        try:
            raw = connection._conn
            seen = await connection._execute(
                lambda db, n: (db is raw, n, threading.current_thread().name), raw, 7
            )
            assert seen[:2] == (True, 7)
            assert seen[2] != threading.current_thread().name

            def fail(_: sqlite3.Connection) -> None:
                raise Boom

            with pytest.raises(Boom):
                await connection._execute(fail, raw)
        finally:
            await connection.close()

    asyncio.run(run())
