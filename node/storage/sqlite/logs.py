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


# The newest log that no longer fits under the bound (by size, newest first). No outer ORDER
# BY: the window streams in its own order from the index and stops at the first row over the
# bound (an outer sort would read every older log); were another row of those over it
# returned, it would be an older one, and the prune would delete less, never more.
_FIRST_OVER = (
    "SELECT ts_ms, request_id FROM (SELECT ts_ms, request_id, SUM(size) OVER"
    " (ORDER BY ts_ms DESC, request_id DESC) AS held FROM interaction_logs)"
    " WHERE held > ? LIMIT 1"
)


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
        # The newest first, as long as they fit: the first that does not, and every older
        # one, go. Found in a read (the sizes' index, newest first, up to that log), so that
        # the write that deletes holds the database for the deletes alone: a log kept
        # meanwhile is newer, and waits for the next prune if it does not fit.
        cutoff = await self._db.fetchone(_FIRST_OVER, (max_bytes,))

        def prune(db: sqlite3.Connection) -> int:
            old = db.execute("DELETE FROM interaction_logs WHERE ts_ms < ?", (before_ms,))
            over = 0
            if cutoff is not None:
                over = db.execute(
                    "DELETE FROM interaction_logs WHERE ts_ms < ?"
                    " OR (ts_ms = ? AND request_id <= ?)",
                    (cutoff[0], cutoff[0], cutoff[1]),
                ).rowcount
            return old.rowcount + over

        return await self._db.atomic(prune)
