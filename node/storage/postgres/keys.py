"""Keys and tenants, in PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg

from node.storage.postgres.connection import Database
from node.storage.records import Conflict, KeyRecord, TenantRecord
from node.storage.rows import (
    KEY_COLUMNS,
    TENANT_COLUMNS,
    json_text,
    key_from_row,
    key_values,
    tenant_from_row,
    tenant_values,
)

INSERT_KEY = (
    f"INSERT INTO keys ({KEY_COLUMNS})"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
)


@contextmanager
def _conflicts() -> Iterator[None]:
    try:
        yield
    except asyncpg.UniqueViolationError as exc:
        raise Conflict(str(exc)) from None


class PostgresKeys:
    """The API keys (and the cross-node keys of peers) and the tenants they belong to."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def insert_key(self, key: KeyRecord) -> None:
        await self._db.execute(INSERT_KEY, *key_values(key))

    async def save_key(self, key: KeyRecord) -> None:
        """Write every mutable field of an existing key."""
        await self._db.execute(
            "UPDATE keys SET name = $1, hash = $2, tenant_id = $3, limits = $4,"
            " allowed_ips = $5, metadata = $6, expires_at = $7, revoked_at = $8,"
            " prev_hash = $9, prev_valid_until = $10 WHERE id = $11",
            key.name,
            key.hash,
            key.tenant_id,
            json_text(key.limits),
            json_text(key.allowed_ips),
            json_text(key.metadata),
            key.expires_at,
            key.revoked_at,
            key.prev_hash,
            key.prev_valid_until,
            key.id,
        )

    async def keys(self, *, include_revoked: bool = True) -> list[KeyRecord]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        rows = await self._db.fetch(
            f"SELECT {KEY_COLUMNS} FROM keys{where} ORDER BY created_at, id"
        )
        return [key_from_row(row) for row in rows]

    async def key(self, key_id: str) -> KeyRecord | None:
        row = await self._db.fetchrow(f"SELECT {KEY_COLUMNS} FROM keys WHERE id = $1", key_id)
        return key_from_row(row) if row else None

    async def active_keys(self) -> list[KeyRecord]:
        return await self.keys(include_revoked=False)

    async def insert_tenant(self, tenant: TenantRecord) -> None:
        """Conflict if the name is taken."""
        with _conflicts():
            await self._db.execute(
                f"INSERT INTO tenants ({TENANT_COLUMNS}) VALUES ($1, $2, $3, $4, $5)",
                *tenant_values(tenant),
            )

    async def save_tenant(self, tenant: TenantRecord) -> None:
        """Conflict if the (new) name is taken."""
        with _conflicts():
            await self._db.execute(
                "UPDATE tenants SET name = $1, limits = $2, metadata = $3 WHERE id = $4",
                tenant.name,
                json_text(tenant.limits),
                json_text(tenant.metadata),
                tenant.id,
            )

    async def tenants(self) -> list[TenantRecord]:
        rows = await self._db.fetch(f"SELECT {TENANT_COLUMNS} FROM tenants ORDER BY name")
        return [tenant_from_row(row) for row in rows]

    async def tenant(self, id_or_name: str) -> TenantRecord | None:
        row = await self._db.fetchrow(
            f"SELECT {TENANT_COLUMNS} FROM tenants WHERE id = $1 OR name = $1", id_or_name
        )
        return tenant_from_row(row) if row else None
