"""Interaction logs, in SQLite."""

from __future__ import annotations

import sqlite3

import msgspec

from node.storage.records import InteractionLog, LogFilter
from node.storage.sqlite.connection import Database

_FIELDS = InteractionLog.__struct_fields__
_COLUMNS = ", ".join(_FIELDS)
_INSERT = (
    f"INSERT OR IGNORE INTO interaction_logs ({_COLUMNS}, size)"
    f" VALUES ({', '.join('?' * (len(_FIELDS) + 1))})"
)


def _entry(row: tuple) -> InteractionLog:
    return msgspec.convert(dict(zip(_FIELDS, row, strict=True)), InteractionLog, strict=False)


class SqliteLogs:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def insert_log(self, entry: InteractionLog) -> None:
        values = tuple(
            int(value) if isinstance(value, bool) else value
            for value in msgspec.structs.astuple(entry)
        )
        await self._db.execute(_INSERT, (*values, entry.size))

    async def logs(self, which: LogFilter) -> list[InteractionLog]:
        where, params = ["ts_ms >= ?"], [which.since_ms]
        for column in ("key_id", "tenant_id", "model", "status"):
            value = getattr(which, column)
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if which.until_ms is not None:
            where.append("ts_ms < ?")
            params.append(which.until_ms)
        rows = await self._db.fetchall(
            f"SELECT {_COLUMNS} FROM interaction_logs WHERE {' AND '.join(where)}"
            " ORDER BY ts_ms DESC, request_id DESC LIMIT ?",
            (*params, which.limit),
        )
        return [_entry(row) for row in rows]

    async def log(self, request_id: str) -> InteractionLog | None:
        row = await self._db.fetchone(
            f"SELECT {_COLUMNS} FROM interaction_logs WHERE request_id = ?", (request_id,)
        )
        return _entry(row) if row is not None else None

    async def prune_logs(self, before_ms: int, max_bytes: int) -> int:
        def prune(db: sqlite3.Connection) -> int:
            old = db.execute("DELETE FROM interaction_logs WHERE ts_ms < ?", (before_ms,))
            # The newest first, as long as they fit: the rest go.
            over = db.execute(
                "DELETE FROM interaction_logs WHERE request_id IN (SELECT request_id FROM"
                " (SELECT request_id, SUM(size) OVER (ORDER BY ts_ms DESC, request_id DESC)"
                " AS held FROM interaction_logs) WHERE held > ?)",
                (max_bytes,),
            )
            return old.rowcount + over.rowcount

        return await self._db.atomic(prune)
