"""Responses API answers kept for their key, in PostgreSQL."""

from __future__ import annotations

from node.storage.postgres.connection import Database
from node.storage.records import StoredResponse


class PostgresResponses:
    """One row per response; every read and delete names the key, so that another key's
    response is as absent as one never made."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def put(self, response: StoredResponse) -> None:
        await self._db.execute(
            "INSERT INTO responses (id, key_id, created_ms, response, input_items, context)"
            " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO UPDATE SET"
            " key_id = excluded.key_id, created_ms = excluded.created_ms,"
            " response = excluded.response, input_items = excluded.input_items,"
            " context = excluded.context",
            response.id,
            response.key_id,
            response.created_ms,
            response.response,
            response.input_items,
            response.context,
        )

    async def get(self, key_id: str, response_id: str) -> StoredResponse | None:
        row = await self._db.fetchrow(
            "SELECT id, key_id, created_ms, response, input_items, context FROM responses"
            " WHERE id = $1 AND key_id = $2",
            response_id,
            key_id,
        )
        return StoredResponse(*row) if row is not None else None

    async def delete(self, key_id: str, response_id: str) -> bool:
        deleted = await self._db.execute(
            "DELETE FROM responses WHERE id = $1 AND key_id = $2", response_id, key_id
        )
        return deleted > 0
