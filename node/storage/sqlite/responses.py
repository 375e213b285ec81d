"""Responses API answers kept for their key, in SQLite."""

from __future__ import annotations

from node.storage.records import StoredResponse
from node.storage.sqlite.connection import Database


class SqliteResponses:
    """One row per response; every read and delete names the key, so that another key's
    response is as absent as one never made."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def put(self, response: StoredResponse) -> None:
        await self._db.execute(
            "INSERT OR REPLACE INTO responses"
            " (id, key_id, created_ms, response, input_items, context) VALUES (?, ?, ?, ?, ?, ?)",
            (
                response.id,
                response.key_id,
                response.created_ms,
                response.response,
                response.input_items,
                response.context,
            ),
        )

    async def get(self, key_id: str, response_id: str) -> StoredResponse | None:
        row = await self._db.fetchone(
            "SELECT id, key_id, created_ms, response, input_items, context FROM responses"
            " WHERE id = ? AND key_id = ?",
            (response_id, key_id),
        )
        return StoredResponse(*row) if row is not None else None

    async def delete(self, key_id: str, response_id: str) -> bool:
        deleted = await self._db.execute(
            "DELETE FROM responses WHERE id = ? AND key_id = ?", (response_id, key_id)
        )
        return deleted > 0
