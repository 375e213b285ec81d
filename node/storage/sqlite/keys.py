"""Keys and tenants, in SQLite."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

import msgspec

from node.storage.records import Conflict, KeyRecord, Limits, TenantRecord
from node.storage.sqlite.connection import Database

_json = msgspec.json.encode

_KEY_COLUMNS = (
    "id, name, hash, is_admin, created_at, tenant_id, limits, allowed_ips, metadata,"
    " expires_at, revoked_at, prev_hash, prev_valid_until, peer_id"
)

INSERT_KEY = f"INSERT INTO keys ({_KEY_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"

_decode_limits = msgspec.json.Decoder(Limits)

decode_strings = msgspec.json.Decoder(list[str])

_decode_metadata = msgspec.json.Decoder(dict[str, str])


def _key_from_row(row: sqlite3.Row | tuple) -> KeyRecord:
    return KeyRecord(
        id=row[0],
        name=row[1],
        hash=row[2],
        is_admin=bool(row[3]),
        created_at=row[4],
        tenant_id=row[5],
        limits=_decode_limits.decode(row[6]),
        allowed_ips=decode_strings.decode(row[7]),
        metadata=_decode_metadata.decode(row[8]),
        expires_at=row[9],
        revoked_at=row[10],
        prev_hash=row[11],
        prev_valid_until=row[12],
        peer_id=row[13],
    )


def key_values(key: KeyRecord) -> tuple:
    return (
        key.id,
        key.name,
        key.hash,
        int(key.is_admin),
        key.created_at,
        key.tenant_id,
        _json(key.limits),
        _json(key.allowed_ips),
        _json(key.metadata),
        key.expires_at,
        key.revoked_at,
        key.prev_hash,
        key.prev_valid_until,
        key.peer_id,
    )


def _tenant_from_row(row: tuple) -> TenantRecord:
    return TenantRecord(
        row[0], row[1], _decode_limits.decode(row[2]), _decode_metadata.decode(row[3]), row[4]
    )


@contextmanager
def _conflicts() -> Iterator[None]:
    try:
        yield
    except sqlite3.IntegrityError as exc:
        raise Conflict(str(exc)) from None


class SqliteKeys:
    """The API keys (and the cross-node keys of peers) and the tenants they belong to."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def insert_key(self, key: KeyRecord) -> None:
        await self._db.execute(INSERT_KEY, key_values(key))

    async def save_key(self, key: KeyRecord) -> None:
        """Write every mutable field of an existing key."""
        await self._db.execute(
            "UPDATE keys SET name = ?, hash = ?, tenant_id = ?, limits = ?, allowed_ips = ?,"
            " metadata = ?, expires_at = ?, revoked_at = ?, prev_hash = ?, prev_valid_until = ?"
            " WHERE id = ?",
            (
                key.name,
                key.hash,
                key.tenant_id,
                _json(key.limits),
                _json(key.allowed_ips),
                _json(key.metadata),
                key.expires_at,
                key.revoked_at,
                key.prev_hash,
                key.prev_valid_until,
                key.id,
            ),
        )

    async def keys(self, *, include_revoked: bool = True) -> list[KeyRecord]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        rows = await self._db.fetchall(
            f"SELECT {_KEY_COLUMNS} FROM keys{where} ORDER BY created_at, id"
        )
        return [_key_from_row(row) for row in rows]

    async def key(self, key_id: str) -> KeyRecord | None:
        row = await self._db.fetchone(f"SELECT {_KEY_COLUMNS} FROM keys WHERE id = ?", (key_id,))
        return _key_from_row(row) if row else None

    async def active_keys(self) -> list[KeyRecord]:
        return await self.keys(include_revoked=False)

    async def insert_tenant(self, tenant: TenantRecord) -> None:
        """Conflict if the name is taken."""
        with _conflicts():
            await self._db.execute(
                "INSERT INTO tenants (id, name, limits, metadata, created_at) VALUES (?,?,?,?,?)",
                (
                    tenant.id,
                    tenant.name,
                    _json(tenant.limits),
                    _json(tenant.metadata),
                    tenant.created_at,
                ),
            )

    async def save_tenant(self, tenant: TenantRecord) -> None:
        """Conflict if the (new) name is taken."""
        with _conflicts():
            await self._db.execute(
                "UPDATE tenants SET name = ?, limits = ?, metadata = ? WHERE id = ?",
                (tenant.name, _json(tenant.limits), _json(tenant.metadata), tenant.id),
            )

    async def tenants(self) -> list[TenantRecord]:
        rows = await self._db.fetchall(
            "SELECT id, name, limits, metadata, created_at FROM tenants ORDER BY name"
        )
        return [_tenant_from_row(row) for row in rows]

    async def tenant(self, id_or_name: str) -> TenantRecord | None:
        row = await self._db.fetchone(
            "SELECT id, name, limits, metadata, created_at FROM tenants WHERE id = ? OR name = ?",
            (id_or_name, id_or_name),
        )
        return _tenant_from_row(row) if row else None
