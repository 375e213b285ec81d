"""The processes serving the node and the change epoch of keys and tenants, in SQLite (every
process is on this host: one clock)."""

from __future__ import annotations

import sqlite3

from node.storage.records import (
    PROCESS_FORGET_MS,
    PROCESS_FRESH_MS,
    ProcessBeat,
    ProcessRecord,
    now_ms,
)
from node.storage.sqlite.connection import Database

_EPOCH = "SELECT COALESCE((SELECT value FROM counters WHERE name = 'changes'), 0)"


class SqliteProcesses:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def epoch(self) -> int:
        row = await self._db.fetchone(_EPOCH)
        return int(row[0]) if row else 0

    async def beat(self, process: ProcessBeat) -> int:
        def work(db: sqlite3.Connection) -> int:
            db.execute(
                "INSERT INTO processes VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (holder)"
                " DO UPDATE SET seen_ms = excluded.seen_ms,"
                " applied = MAX(applied, excluded.applied)",
                (
                    process.holder,
                    process.host,
                    process.pid,
                    process.folder,
                    process.path,
                    now_ms(),
                    process.applied,
                ),
            )
            return int(db.execute(_EPOCH).fetchone()[0])

        return await self._db.atomic(work)

    async def applied(self, holder: str, epoch: int) -> None:
        await self._db.execute(
            "UPDATE processes SET applied = MAX(applied, ?), seen_ms = ? WHERE holder = ?",
            (epoch, now_ms(), holder),
        )

    async def live(self) -> list[ProcessRecord]:
        now = now_ms()
        rows = await self._db.fetchall(
            "SELECT holder, host, pid, folder, path, ? - seen_ms, applied FROM processes"
            " WHERE seen_ms > ? ORDER BY host, pid",
            (now, now - PROCESS_FRESH_MS),
        )
        return [ProcessRecord(*row) for row in rows]

    async def leave(self, holder: str) -> None:
        await self._db.execute("DELETE FROM processes WHERE holder = ?", (holder,))


def prune_processes(db: sqlite3.Connection, now_ms: int) -> None:
    """Forget processes not heard from for a day."""
    db.execute("DELETE FROM processes WHERE seen_ms < ?", (now_ms - PROCESS_FORGET_MS,))
