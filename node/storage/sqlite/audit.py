"""The audit log, in SQLite."""

from __future__ import annotations

import msgspec

from node.storage.records import AuditEvent
from node.storage.sqlite.connection import Database


class SqliteAudit:
    """Who did what to which key, tenant or peer, newest first."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def audit(
        self, since_ms: int = 0, limit: int = 100, action: str | None = None
    ) -> list[AuditEvent]:
        where, params = "ts_ms >= ?", [since_ms]
        if action:
            where += " AND action LIKE ?"
            params.append(action.replace("*", "%"))
        rows = await self._db.fetchall(
            f"SELECT ts_ms, action, actor, target, ip, detail FROM audit WHERE {where}"
            " ORDER BY ts_ms DESC, id DESC LIMIT ?",  # newest first, by the index on ts_ms
            [*params, limit],
        )
        return [AuditEvent(r[0], r[1], r[2], r[3], r[4], msgspec.json.decode(r[5])) for r in rows]
