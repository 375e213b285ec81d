"""The response cache's answers, in PostgreSQL."""

from __future__ import annotations

import asyncpg

from node.storage.postgres.connection import Database
from node.storage.records import CachedAnswer


class PostgresCache:
    """One row per (scope, digest); every read names the scope."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def cached(self, scope: str, digest: bytes, now_ms: int) -> CachedAnswer | None:
        row = await self._db.fetchrow(
            "UPDATE response_cache SET used_ms = $1 WHERE scope = $2 AND digest = $3"
            " AND expires_ms > $1 RETURNING scope, digest, created_ms, expires_ms, answer",
            now_ms,
            scope,
            digest,
        )
        return CachedAnswer(*row) if row is not None else None

    async def keep(self, answer: CachedAnswer, now_ms: int, max_entries: int) -> None:
        async def write(db: asyncpg.Connection) -> None:
            await db.execute(
                "INSERT INTO response_cache"
                " (scope, digest, created_ms, expires_ms, used_ms, answer)"
                " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (scope, digest) DO UPDATE SET"
                " created_ms = excluded.created_ms, expires_ms = excluded.expires_ms,"
                " used_ms = excluded.used_ms, answer = excluded.answer",
                answer.scope,
                answer.digest,
                answer.created_ms,
                answer.expires_ms,
                now_ms,
                answer.answer,
            )
            await db.execute(
                "DELETE FROM response_cache WHERE (scope, digest) IN (SELECT scope, digest"
                " FROM response_cache ORDER BY used_ms DESC OFFSET $1)",
                max_entries,
            )

        await self._db.atomic(write)

    async def prune_cache(self, now_ms: int) -> int:
        return await self._db.execute("DELETE FROM response_cache WHERE expires_ms <= $1", now_ms)
