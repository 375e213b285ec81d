"""The processes serving the node and the change epoch of keys and tenants, in PostgreSQL.
Heartbeats are stamped in the database's clock, so that hosts whose clocks differ still agree
on which processes are live."""

from __future__ import annotations

import asyncpg

from node.storage.postgres.connection import Database
from node.storage.records import PROCESS_FORGET_MS, PROCESS_FRESH_MS, ProcessBeat, ProcessRecord

_EPOCH = "SELECT COALESCE((SELECT value FROM counters WHERE name = 'changes'), 0)"
# The database's time now, in milliseconds (the statement's: one value however long it runs).
NOW_MS = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"


class PostgresProcesses:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def epoch(self) -> int:
        return int(await self._db.fetchval(_EPOCH))  # type: ignore[arg-type]

    async def beat(self, process: ProcessBeat) -> int:
        # One statement: the row written and the epoch read in one round trip.
        value = await self._db.fetchval(
            "WITH beat AS (INSERT INTO processes VALUES ($1, $2, $3, $4, $5, "
            + NOW_MS
            + ", $6) ON CONFLICT (holder) DO UPDATE SET seen_ms = excluded.seen_ms,"
            " applied = GREATEST(processes.applied, excluded.applied))"
            " SELECT COALESCE((SELECT value FROM counters WHERE name = 'changes'), 0)",
            process.holder,
            process.host,
            process.pid,
            process.folder,
            process.path,
            process.applied,
        )
        return int(value)  # type: ignore[arg-type]

    async def applied(self, holder: str, epoch: int) -> None:
        await self._db.execute(
            "UPDATE processes SET applied = GREATEST(applied, $1), seen_ms = "
            + NOW_MS
            + " WHERE holder = $2",
            epoch,
            holder,
        )

    async def live(self) -> list[ProcessRecord]:
        rows = await self._db.fetch(
            "SELECT holder, host, pid, folder, path, " + NOW_MS + " - seen_ms, applied"
            " FROM processes WHERE seen_ms > " + NOW_MS + " - $1 ORDER BY host, pid",
            PROCESS_FRESH_MS,
        )
        return [ProcessRecord(*row) for row in rows]

    async def leave(self, holder: str) -> None:
        await self._db.execute("DELETE FROM processes WHERE holder = $1", holder)


async def prune_processes(db: asyncpg.Connection) -> None:
    """Forget processes not heard from for a day."""
    await db.execute("DELETE FROM processes WHERE seen_ms < " + NOW_MS + " - $1", PROCESS_FORGET_MS)
