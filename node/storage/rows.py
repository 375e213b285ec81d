"""Records as table rows and back, for every backend: the columns are the same in SQLite and
PostgreSQL (`migrations`), and so are the tuples. JSON columns are written as text."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from node.storage.records import InviteRow, KeyRecord, Limits, PeerRecord, TenantRecord

Row = Sequence  # a sqlite3 row tuple or an asyncpg Record: both index by position


def json_text(value: object) -> str:
    return msgspec.json.encode(value).decode()


KEY_COLUMNS = (
    "id, name, hash, is_admin, created_at, tenant_id, limits, allowed_ips, metadata,"
    " expires_at, revoked_at, prev_hash, prev_valid_until, peer_id"
)

TENANT_COLUMNS = "id, name, limits, metadata, created_at"

PEER_COLUMNS = (
    "node_id, name, descriptor, status, created_at, key_for_them, key_from_them, advert,"
    " listed, revoked_at"
)

INVITE_COLUMNS = "token_id, public_key, exp, uses_left, models, cap_micros, cap_period, created_at"

_decode_limits = msgspec.json.Decoder(Limits)

decode_strings = msgspec.json.Decoder(list[str])

_decode_metadata = msgspec.json.Decoder(dict[str, str])


def key_from_row(row: Row) -> KeyRecord:
    return KeyRecord(
        id=row[0],
        name=row[1],
        hash=bytes(row[2]),
        is_admin=bool(row[3]),
        created_at=row[4],
        tenant_id=row[5],
        limits=_decode_limits.decode(row[6]),
        allowed_ips=decode_strings.decode(row[7]),
        metadata=_decode_metadata.decode(row[8]),
        expires_at=row[9],
        revoked_at=row[10],
        prev_hash=None if row[11] is None else bytes(row[11]),
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
        json_text(key.limits),
        json_text(key.allowed_ips),
        json_text(key.metadata),
        key.expires_at,
        key.revoked_at,
        key.prev_hash,
        key.prev_valid_until,
        key.peer_id,
    )


def tenant_from_row(row: Row) -> TenantRecord:
    return TenantRecord(
        row[0], row[1], _decode_limits.decode(row[2]), _decode_metadata.decode(row[3]), row[4]
    )


def tenant_values(tenant: TenantRecord) -> tuple:
    return (
        tenant.id,
        tenant.name,
        json_text(tenant.limits),
        json_text(tenant.metadata),
        tenant.created_at,
    )


def peer_from_row(row: Row) -> PeerRecord:
    return PeerRecord(*row[:8], listed=bool(row[8]), revoked_at=row[9])


def peer_values(peer: PeerRecord) -> tuple:
    return (
        peer.node_id,
        peer.name,
        peer.descriptor,
        peer.status,
        peer.created_at,
        peer.key_for_them,
        peer.key_from_them,
        peer.advert,
        int(peer.listed),
        peer.revoked_at,
    )


def invite_from_row(row: Row) -> InviteRow:
    return InviteRow(
        row[0], bytes(row[1]), row[2], row[3], decode_strings.decode(row[4]), *row[5:8]
    )


def invite_values(invite: InviteRow) -> tuple:
    return (
        invite.token_id,
        invite.public_key,
        invite.exp,
        invite.uses_left,
        json_text(invite.models),
        invite.cap_micros,
        invite.cap_period,
        invite.created_at,
    )
