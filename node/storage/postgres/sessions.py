"""The dashboard's sign-in sessions, in PostgreSQL."""

from __future__ import annotations

import asyncpg

from node.storage.postgres.connection import Database
from node.storage.records import SessionRecord


class PostgresSessions:
    """Sessions by the hash of their cookie; an expired one is never answered."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def insert_session(self, session: SessionRecord) -> None:
        await self._db.execute(
            "INSERT INTO ui_sessions (id_hash, key_id, csrf, created_ms, expires_ms)"
            " VALUES ($1, $2, $3, $4, $5)",
            session.id_hash,
            session.key_id,
            session.csrf,
            session.created_ms,
            session.expires_ms,
        )

    async def session(self, id_hash: bytes, now_ms: int) -> SessionRecord | None:
        row = await self._db.fetchrow(
            "SELECT id_hash, key_id, csrf, created_ms, expires_ms FROM ui_sessions"
            " WHERE id_hash = $1 AND expires_ms > $2",
            id_hash,
            now_ms,
        )
        return SessionRecord(*row) if row is not None else None

    async def delete_session(self, id_hash: bytes) -> bool:
        return await self._db.execute("DELETE FROM ui_sessions WHERE id_hash = $1", id_hash) > 0


async def prune_sessions(db: asyncpg.Connection, now: int) -> None:
    """Forget sessions past their expiry (`now` in seconds)."""
    await db.execute("DELETE FROM ui_sessions WHERE expires_ms <= $1", now * 1000)
