"""Interaction logs, in PostgreSQL."""

from __future__ import annotations

import asyncpg
import msgspec

from node.storage.postgres.connection import Database, changed
from node.storage.records import InteractionLog, LogFilter

_FIELDS = InteractionLog.__struct_fields__
_COLUMNS = ", ".join(_FIELDS)
_INSERT = (
    f"INSERT INTO interaction_logs ({_COLUMNS}, size)"
    f" VALUES ({', '.join(f'${n}' for n in range(1, len(_FIELDS) + 2))})"
    " ON CONFLICT (request_id) DO NOTHING"
)


def _entry(row: asyncpg.Record) -> InteractionLog:
    return msgspec.convert(dict(row), InteractionLog, strict=False)


class PostgresLogs:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def insert_log(self, entry: InteractionLog) -> None:
        values = tuple(
            int(value) if isinstance(value, bool) else value
            for value in msgspec.structs.astuple(entry)
        )
        await self._db.execute(_INSERT, *values, entry.size)

    async def logs(self, which: LogFilter) -> list[InteractionLog]:
        params: list[object] = [which.since_ms]
        where = ["ts_ms >= $1"]
        for column in ("key_id", "tenant_id", "model", "status"):
            value = getattr(which, column)
            if value is not None:
                params.append(value)
                where.append(f"{column} = ${len(params)}")
        if which.until_ms is not None:
            params.append(which.until_ms)
            where.append(f"ts_ms < ${len(params)}")
        params.append(which.limit)
        rows = await self._db.fetch(
            f"SELECT {_COLUMNS} FROM interaction_logs WHERE {' AND '.join(where)}"
            f" ORDER BY ts_ms DESC, request_id DESC LIMIT ${len(params)}",
            *params,
        )
        return [_entry(row) for row in rows]

    async def log(self, request_id: str) -> InteractionLog | None:
        row = await self._db.fetchrow(
            f"SELECT {_COLUMNS} FROM interaction_logs WHERE request_id = $1", request_id
        )
        return _entry(row) if row is not None else None

    async def prune_logs(self, before_ms: int, max_bytes: int) -> int:
        # As SQLite's: the first log over the bound found in a read (the sizes' index,
        # newest first), then it and every older one deleted in a short transaction.
        cutoff = await self._db.fetchrow(
            "SELECT ts_ms, request_id FROM (SELECT ts_ms, request_id, SUM(size) OVER"
            " (ORDER BY ts_ms DESC, request_id DESC) AS held FROM interaction_logs) AS running"
            " WHERE held > $1 LIMIT 1",
            max_bytes,
        )

        async def prune(db: asyncpg.Connection) -> int:
            old = await db.execute("DELETE FROM interaction_logs WHERE ts_ms < $1", before_ms)
            if cutoff is None:
                return changed(old)
            over = await db.execute(
                "DELETE FROM interaction_logs WHERE (ts_ms, request_id) <= ($1, $2)",
                cutoff["ts_ms"],
                cutoff["request_id"],
            )
            return changed(old) + changed(over)

        return await self._db.atomic(prune)
