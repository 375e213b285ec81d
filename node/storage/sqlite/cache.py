"""The response cache's answers, in SQLite."""

from __future__ import annotations

import sqlite3

from node.storage.records import CachedAnswer
from node.storage.sqlite.connection import Database


class SqliteCache:
    """One row per (scope, digest); every read names the scope."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def cached(self, scope: str, digest: bytes, now_ms: int) -> CachedAnswer | None:
        def read(db: sqlite3.Connection) -> CachedAnswer | None:
            row = db.execute(
                "UPDATE response_cache SET used_ms = ? WHERE scope = ? AND digest = ?"
                " AND expires_ms > ? RETURNING scope, digest, created_ms, expires_ms, answer",
                (now_ms, scope, digest, now_ms),
            ).fetchone()
            return CachedAnswer(*row) if row is not None else None

        return await self._db.atomic(read)

    async def keep(self, answer: CachedAnswer, now_ms: int, max_entries: int) -> None:
        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT OR REPLACE INTO response_cache"
                " (scope, digest, created_ms, expires_ms, used_ms, answer)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    answer.scope,
                    answer.digest,
                    answer.created_ms,
                    answer.expires_ms,
                    now_ms,
                    answer.answer,
                ),
            )
            # The least recently used beyond the bound: the index on used_ms walks only the
            # kept ones before it reaches them.
            db.execute(
                "DELETE FROM response_cache WHERE rowid IN (SELECT rowid FROM response_cache"
                " ORDER BY used_ms DESC LIMIT -1 OFFSET ?)",
                (max_entries,),
            )

        await self._db.atomic(write)

    async def prune_cache(self, now_ms: int) -> int:
        return await self._db.execute("DELETE FROM response_cache WHERE expires_ms <= ?", (now_ms,))
