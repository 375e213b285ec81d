"""The audit log, in PostgreSQL."""

from __future__ import annotations

import msgspec

from node.storage.postgres.connection import Database
from node.storage.records import AuditEvent


class PostgresAudit:
    """Who did what to which key, tenant or peer, newest first."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def audit(
        self, since_ms: int = 0, limit: int = 100, action: str | None = None
    ) -> list[AuditEvent]:
        where, params = "ts_ms >= $1", [since_ms]
        if action:
            # LIKE as SQLite's: `*` is the wildcard; `_` and `%` typed by a user match as
            # SQLite's LIKE matches them (PostgreSQL's is case-sensitive, SQLite's is not
            # for ASCII: ILIKE keeps the two the same).
            where += " AND action ILIKE $2"
            params.append(action.replace("*", "%"))
        rows = await self._db.fetch(
            f"SELECT ts_ms, action, actor, target, ip, detail FROM audit WHERE {where}"
            f" ORDER BY ts_ms DESC, id DESC LIMIT ${len(params) + 1}",
            *params,
            max(limit, 0),
        )
        return [AuditEvent(r[0], r[1], r[2], r[3], r[4], msgspec.json.decode(r[5])) for r in rows]
