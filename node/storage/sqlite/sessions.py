"""The dashboard's sign-in sessions, in SQLite."""

from __future__ import annotations

import sqlite3

from node.storage.records import SessionRecord
from node.storage.sqlite.connection import Database


class SqliteSessions:
    """Sessions by the hash of their cookie; an expired one is never answered."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def insert_session(self, session: SessionRecord) -> None:
        await self._db.execute(
            "INSERT INTO ui_sessions (id_hash, key_id, csrf, created_ms, expires_ms)"
            " VALUES (?,?,?,?,?)",
            (session.id_hash, session.key_id, session.csrf, session.created_ms, session.expires_ms),
        )

    async def session(self, id_hash: bytes, now_ms: int) -> SessionRecord | None:
        row = await self._db.fetchone(
            "SELECT id_hash, key_id, csrf, created_ms, expires_ms FROM ui_sessions"
            " WHERE id_hash = ? AND expires_ms > ?",
            (id_hash, now_ms),
        )
        return SessionRecord(*row) if row else None

    async def delete_session(self, id_hash: bytes) -> bool:
        return await self._db.execute("DELETE FROM ui_sessions WHERE id_hash = ?", (id_hash,)) > 0


def prune_sessions(db: sqlite3.Connection, now: int) -> None:
    """Forget sessions past their expiry (`now` in seconds)."""
    db.execute("DELETE FROM ui_sessions WHERE expires_ms <= ?", (now * 1000,))
