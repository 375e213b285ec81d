"""Peers and invites, in PostgreSQL: join requests and answers, peer health, nonces seen and
node-wide counters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import asyncpg

from node.storage.postgres.connection import Database, changed, lock_key
from node.storage.postgres.keys import INSERT_KEY
from node.storage.records import InviteRow, JoinRequestBounds, KeyRecord, PeerRecord
from node.storage.rows import (
    INVITE_COLUMNS,
    PEER_COLUMNS,
    invite_from_row,
    invite_values,
    key_values,
    peer_from_row,
    peer_values,
)

_UPSERT_PEER = (
    f"INSERT INTO peers ({PEER_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
    " ON CONFLICT (node_id) DO UPDATE SET name = excluded.name,"
    " descriptor = excluded.descriptor, status = excluded.status,"
    " key_for_them = COALESCE(excluded.key_for_them, peers.key_for_them),"
    " key_from_them = COALESCE(excluded.key_from_them, peers.key_from_them),"
    " advert = COALESCE(excluded.advert, peers.advert), listed = excluded.listed,"
    " revoked_at = excluded.revoked_at"
)

# Join requests are counted, then one is added: one lock for the table's places.
_JOIN_REQUESTS_LOCK = lock_key("join_requests")


class PostgresPeers:
    """The nodes we peer with, the invites and join requests that make peers, and the nonces
    their signed requests must not repeat."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def insert_invite(self, invite: InviteRow) -> None:
        await self._db.execute(
            f"INSERT INTO invites ({INVITE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            *invite_values(invite),
        )

    async def invite(self, token_id: str) -> InviteRow | None:
        row = await self._db.fetchrow(
            f"SELECT {INVITE_COLUMNS} FROM invites WHERE token_id = $1", token_id
        )
        return invite_from_row(row) if row else None

    async def accept_join(
        self, token_id: str | None, now: int, key: KeyRecord, peer: PeerRecord
    ) -> bool:
        """Spend one use of an invite (if any), issue the peer's key and record the peer, in
        one transaction: a used-up or expired invite changes nothing. The invite's row is
        locked by its update, so two processes cannot both spend its last use."""

        async def join(db: asyncpg.Connection) -> bool:
            if token_id is not None:
                spent = await db.execute(
                    "UPDATE invites SET uses_left = uses_left - 1"
                    " WHERE token_id = $1 AND uses_left > 0 AND exp > $2",
                    token_id,
                    now,
                )
                if changed(spent) != 1:
                    return False
            # A peer that joins again gets a fresh key; the old one stops working.
            await db.execute(
                "UPDATE keys SET revoked_at = $1 WHERE peer_id = $2 AND revoked_at IS NULL",
                now,
                key.peer_id,
            )
            await db.execute(INSERT_KEY, *key_values(key))
            await db.execute(_UPSERT_PEER, *peer_values(peer))
            await db.execute("DELETE FROM join_requests WHERE node_id = $1", peer.node_id)
            return True

        return await self._db.atomic(join)

    async def save_peer(self, peer: PeerRecord) -> None:
        await self._db.execute(_UPSERT_PEER, *peer_values(peer))

    async def peers(self, *, include_revoked: bool = False) -> list[PeerRecord]:
        where = "" if include_revoked else " WHERE status != 'revoked'"
        rows = await self._db.fetch(
            f"SELECT {PEER_COLUMNS} FROM peers{where} ORDER BY name, node_id"
        )
        return [peer_from_row(row) for row in rows]

    async def peer(self, node_id: str) -> PeerRecord | None:
        row = await self._db.fetchrow(
            f"SELECT {PEER_COLUMNS} FROM peers WHERE node_id = $1", node_id
        )
        return peer_from_row(row) if row else None

    async def revoke_peer(self, node_id: str, now: int, status: str = "revoked") -> None:
        """Cut a peer off (`revoked` by the admin, or `suspended` for cheating): its status,
        and the key we issued to it, in one transaction."""

        async def revoke(db: asyncpg.Connection) -> None:
            await db.execute(
                "UPDATE peers SET status = $1, revoked_at = $2 WHERE node_id = $3",
                status,
                now,
                node_id,
            )
            await db.execute(
                "UPDATE keys SET revoked_at = $1 WHERE peer_id = $2 AND revoked_at IS NULL",
                now,
                node_id,
            )

        await self._db.atomic(revoke)

    async def add_join_request(
        self, node_id: str, descriptor: str, now: int, bounds: JoinRequestBounds
    ) -> Literal["source", "total"] | None:
        """Keep a join request (a node asking again refreshes its descriptor, not its age);
        None, or which bound refused it. Requests older than the bounds' ttl are dropped
        first. One transaction under one lock: two processes cannot both take the last
        place."""

        async def add(db: asyncpg.Connection) -> Literal["source", "total"] | None:
            await db.execute("SELECT pg_advisory_xact_lock($1)", _JOIN_REQUESTS_LOCK)
            await db.execute("DELETE FROM join_requests WHERE received_at <= $1", now - bounds.ttl)
            refreshed = await db.execute(
                "UPDATE join_requests SET descriptor = $1 WHERE node_id = $2",
                descriptor,
                node_id,
            )
            if changed(refreshed):
                return None
            from_source = await db.fetchval(
                "SELECT COUNT(*) FROM join_requests WHERE source = $1", bounds.source
            )
            if from_source >= bounds.per_source:
                return "source"
            if await db.fetchval("SELECT COUNT(*) FROM join_requests") >= bounds.total:
                return "total"
            await db.execute(
                "INSERT INTO join_requests (node_id, descriptor, received_at, source)"
                " VALUES ($1, $2, $3, $4)",
                node_id,
                descriptor,
                now,
                bounds.source,
            )
            return None

        return await self._db.atomic(add)

    async def join_requests(self) -> list[tuple[str, str, int]]:
        rows = await self._db.fetch(
            "SELECT node_id, descriptor, received_at FROM join_requests ORDER BY received_at"
        )
        return [(row[0], row[1], row[2]) for row in rows]

    async def join_request(self, node_id: str) -> str | None:
        """The descriptor a pending join request came with."""
        row = await self._db.fetchrow(
            "SELECT descriptor FROM join_requests WHERE node_id = $1", node_id
        )
        return row[0] if row else None

    async def save_join_answer(self, node_id: str, answer: str, now: int) -> None:
        await self._db.execute(
            "INSERT INTO join_answers VALUES ($1, $2, $3) ON CONFLICT (node_id)"
            " DO UPDATE SET answer = excluded.answer, created_at = excluded.created_at",
            node_id,
            answer,
            now,
        )

    async def join_answer(self, node_id: str) -> str | None:
        row = await self._db.fetchrow("SELECT answer FROM join_answers WHERE node_id = $1", node_id)
        return row[0] if row else None

    async def save_peer_health(
        self, node_id: str, healthy: bool, latency_ms: int | None, now: int
    ) -> None:
        await self._db.execute(
            "INSERT INTO peer_health VALUES ($1, $2, $3, $4) ON CONFLICT (node_id) DO UPDATE"
            " SET healthy = excluded.healthy, latency_ms = excluded.latency_ms,"
            " checked_at = excluded.checked_at",
            node_id,
            int(healthy),
            latency_ms,
            now,
        )

    async def peer_health(self) -> dict[str, tuple[bool, int | None, int]]:
        rows = await self._db.fetch(
            "SELECT node_id, healthy, latency_ms, checked_at FROM peer_health"
        )
        return {row[0]: (bool(row[1]), row[2], row[3]) for row in rows}

    async def next_counter(self, name: str, floor: int = 1) -> int:
        """Atomically move a node-wide counter past its last value, to at least `floor`."""
        value = await self._db.fetchval(
            "INSERT INTO counters VALUES ($1, GREATEST($2::bigint, 1)) ON CONFLICT (name)"
            " DO UPDATE SET value = GREATEST(counters.value + 1, EXCLUDED.value)"
            " RETURNING value",
            name,
            floor,
        )
        return int(value)

    async def counter(self, name: str) -> int:
        value = await self._db.fetchval("SELECT value FROM counters WHERE name = $1", name)
        return int(value) if value is not None else 0

    async def claim_turn(self, name: str, turn: int) -> bool:
        claimed = await self._db.fetchval(
            "INSERT INTO counters VALUES ($1, $2) ON CONFLICT (name) DO UPDATE"
            " SET value = EXCLUDED.value WHERE counters.value < EXCLUDED.value RETURNING 1",
            name,
            turn,
        )
        return claimed is not None

    async def claim_nonce(self, pair: bytes, expires: int, now: int) -> bool:
        """Record `pair` (a digest of who signed and the nonce) as used until `expires`: True
        if it is new, False if it is already recorded and not expired (a replay)."""
        return (await self.claim_nonces([(pair, expires)], now))[0]

    async def claim_nonces(self, claims: Sequence[tuple[bytes, int]], now: int) -> list[bool]:
        """`claim_nonce` for each of `claims` (pair, expires), in one statement: each row's
        lock decides between two processes that claim it at once, and the pairs that came
        out new are those the statement returns. A pair twice in `claims` is new at most
        once: only its first claim goes into the statement (which could not insert one row
        twice anyway), the later ones are replays of it. A row left by an expired nonce (not
        yet pruned) is taken over: the expiry check, not this table, refuses a signature
        that old."""
        first: dict[bytes, int] = {}
        for pair, expires in claims:
            first.setdefault(pair, expires)
        # In one order, so that two processes claiming overlapping batches wait for each
        # other's rows rather than deadlock.
        pairs = sorted(first)
        rows = await self._db.fetch(
            "INSERT INTO nonces (pair, expires)"
            " SELECT * FROM unnest($1::bytea[], $2::bigint[]) ORDER BY 1"
            " ON CONFLICT (pair) DO UPDATE SET expires = excluded.expires"
            " WHERE nonces.expires < $3 RETURNING pair",
            pairs,
            [first[pair] for pair in pairs],
            now,
        )
        new = {row[0] for row in rows}
        answers = []
        for pair, _ in claims:
            answers.append(pair in new)
            new.discard(pair)  # a second claim of a pair in this batch is its replay
        return answers


async def prune_nonces(db: asyncpg.Connection, now: int) -> None:
    """Forget the nonces whose signatures could no longer be accepted anyway."""
    await db.execute("DELETE FROM nonces WHERE expires < $1", now)
