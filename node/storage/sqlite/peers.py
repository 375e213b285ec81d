"""Peers and invites, in SQLite: join requests and answers, peer health, nonces seen and
node-wide counters."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Literal

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
from node.storage.sqlite.connection import Database
from node.storage.sqlite.keys import INSERT_KEY

_UPSERT_PEER = (
    f"INSERT INTO peers ({PEER_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT (node_id) DO UPDATE SET name = excluded.name,"
    " descriptor = excluded.descriptor, status = excluded.status,"
    " key_for_them = COALESCE(excluded.key_for_them, key_for_them),"
    " key_from_them = COALESCE(excluded.key_from_them, key_from_them),"
    " advert = COALESCE(excluded.advert, advert), listed = excluded.listed,"
    " revoked_at = excluded.revoked_at"
)


class SqlitePeers:
    """The nodes we peer with, the invites and join requests that make peers, and the nonces
    their signed requests must not repeat."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def insert_invite(self, invite: InviteRow) -> None:
        await self._db.execute(
            f"INSERT INTO invites ({INVITE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
            invite_values(invite),
        )

    async def invite(self, token_id: str) -> InviteRow | None:
        row = await self._db.fetchone(
            f"SELECT {INVITE_COLUMNS} FROM invites WHERE token_id = ?", (token_id,)
        )
        return invite_from_row(row) if row else None

    async def accept_join(
        self, token_id: str | None, now: int, key: KeyRecord, peer: PeerRecord
    ) -> bool:
        """Spend one use of an invite (if any), issue the peer's key and record the peer, in
        one transaction: a used-up or expired invite changes nothing."""

        def join(db: sqlite3.Connection) -> bool:
            if token_id is not None:
                spent = db.execute(
                    "UPDATE invites SET uses_left = uses_left - 1"
                    " WHERE token_id = ? AND uses_left > 0 AND exp > ?",
                    (token_id, now),
                ).rowcount
                if spent != 1:
                    return False
            # A peer that joins again gets a fresh key; the old one stops working.
            db.execute(
                "UPDATE keys SET revoked_at = ? WHERE peer_id = ? AND revoked_at IS NULL",
                (now, key.peer_id),
            )
            db.execute(INSERT_KEY, key_values(key))
            db.execute(_UPSERT_PEER, peer_values(peer))
            db.execute("DELETE FROM join_requests WHERE node_id = ?", (peer.node_id,))
            return True

        return await self._db.atomic(join)

    async def save_peer(self, peer: PeerRecord) -> None:
        await self._db.execute(_UPSERT_PEER, peer_values(peer))

    async def peers(self, *, include_revoked: bool = False) -> list[PeerRecord]:
        where = "" if include_revoked else " WHERE status != 'revoked'"
        rows = await self._db.fetchall(
            f"SELECT {PEER_COLUMNS} FROM peers{where} ORDER BY name, node_id"
        )
        return [peer_from_row(row) for row in rows]

    async def peer(self, node_id: str) -> PeerRecord | None:
        row = await self._db.fetchone(
            f"SELECT {PEER_COLUMNS} FROM peers WHERE node_id = ?", (node_id,)
        )
        return peer_from_row(row) if row else None

    async def revoke_peer(self, node_id: str, now: int, status: str = "revoked") -> None:
        """Cut a peer off (`revoked` by the admin, or `suspended` for cheating): its status,
        and the key we issued to it, in one transaction."""

        def revoke(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE peers SET status = ?, revoked_at = ? WHERE node_id = ?",
                (status, now, node_id),
            )
            db.execute(
                "UPDATE keys SET revoked_at = ? WHERE peer_id = ? AND revoked_at IS NULL",
                (now, node_id),
            )

        await self._db.atomic(revoke)

    async def add_join_request(
        self, node_id: str, descriptor: str, now: int, bounds: JoinRequestBounds
    ) -> Literal["source", "total"] | None:
        """Keep a join request (a node asking again refreshes its descriptor, not its age);
        None, or which bound refused it. Requests older than the bounds' ttl are dropped
        first. One transaction: two workers cannot both take the last place."""

        def add(db: sqlite3.Connection) -> Literal["source", "total"] | None:
            db.execute("DELETE FROM join_requests WHERE received_at <= ?", (now - bounds.ttl,))
            if db.execute(
                "UPDATE join_requests SET descriptor = ? WHERE node_id = ?", (descriptor, node_id)
            ).rowcount:
                return None
            (from_source,) = db.execute(
                "SELECT COUNT(*) FROM join_requests WHERE source = ?", (bounds.source,)
            ).fetchone()
            if from_source >= bounds.per_source:
                return "source"
            (pending,) = db.execute("SELECT COUNT(*) FROM join_requests").fetchone()
            if pending >= bounds.total:
                return "total"
            db.execute(
                "INSERT INTO join_requests (node_id, descriptor, received_at, source)"
                " VALUES (?, ?, ?, ?)",
                (node_id, descriptor, now, bounds.source),
            )
            return None

        return await self._db.atomic(add)

    async def join_requests(self) -> list[tuple[str, str, int]]:
        rows = await self._db.fetchall(
            "SELECT node_id, descriptor, received_at FROM join_requests ORDER BY received_at"
        )
        return [(row[0], row[1], row[2]) for row in rows]

    async def join_request(self, node_id: str) -> str | None:
        """The descriptor a pending join request came with."""
        row = await self._db.fetchone(
            "SELECT descriptor FROM join_requests WHERE node_id = ?", (node_id,)
        )
        return row[0] if row else None

    async def save_join_answer(self, node_id: str, answer: str, now: int) -> None:
        await self._db.execute(
            "INSERT INTO join_answers VALUES (?, ?, ?) ON CONFLICT (node_id)"
            " DO UPDATE SET answer = excluded.answer, created_at = excluded.created_at",
            (node_id, answer, now),
        )

    async def join_answer(self, node_id: str) -> str | None:
        row = await self._db.fetchone(
            "SELECT answer FROM join_answers WHERE node_id = ?", (node_id,)
        )
        return row[0] if row else None

    async def save_peer_health(
        self, node_id: str, healthy: bool, latency_ms: int | None, now: int
    ) -> None:
        await self._db.execute(
            "INSERT INTO peer_health VALUES (?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET"
            " healthy = excluded.healthy, latency_ms = excluded.latency_ms,"
            " checked_at = excluded.checked_at",
            (node_id, int(healthy), latency_ms, now),
        )

    async def peer_health(self) -> dict[str, tuple[bool, int | None, int]]:
        rows = await self._db.fetchall(
            "SELECT node_id, healthy, latency_ms, checked_at FROM peer_health"
        )
        return {row[0]: (bool(row[1]), row[2], row[3]) for row in rows}

    async def next_counter(self, name: str, floor: int = 1) -> int:
        """Atomically move a node-wide counter past its last value, to at least `floor`."""
        return await self._db.atomic(
            lambda db: int(
                db.execute(
                    "INSERT INTO counters VALUES (?, max(?, 1)) ON CONFLICT (name)"
                    " DO UPDATE SET value = max(value + 1, excluded.value) RETURNING value",
                    (name, floor),
                ).fetchone()[0]
            )
        )

    async def counter(self, name: str) -> int:
        row = await self._db.fetchone("SELECT value FROM counters WHERE name = ?", (name,))
        return int(row[0]) if row else 0

    async def claim_turn(self, name: str, turn: int) -> bool:
        claimed = await self._db.execute(
            "INSERT INTO counters VALUES (?, ?) ON CONFLICT (name) DO UPDATE"
            " SET value = excluded.value WHERE counters.value < excluded.value",
            (name, turn),
        )
        return claimed == 1

    async def claim_nonce(self, pair: bytes, expires: int, now: int) -> bool:
        """Record `pair` (a digest of who signed and the nonce) as used until `expires`: True
        if it is new, False if it is already recorded and not expired (a replay)."""
        return (await self.claim_nonces([(pair, expires)], now))[0]

    async def claim_nonces(self, claims: Sequence[tuple[bytes, int]], now: int) -> list[bool]:
        """`claim_nonce` for each of `claims` (pair, expires), in one transaction: a
        statement each, so that two processes cannot both see a pair new. A pair twice in
        `claims` is new at most once: its later claims are replays of the first."""
        return await self._db.atomic(lambda db: _claim_nonces(db, claims, now), inline=True)


def _claim_nonces(
    db: sqlite3.Connection, claims: Sequence[tuple[bytes, int]], now: int
) -> list[bool]:
    answers, seen = [], set()
    for pair, expires in claims:
        # A row left by an expired nonce (not yet pruned) is taken over: the expiry check,
        # not this table, refuses a signature that old.
        answers.append(
            pair not in seen
            and db.execute(
                "INSERT INTO nonces (pair, expires) VALUES (?, ?) ON CONFLICT (pair)"
                " DO UPDATE SET expires = excluded.expires WHERE nonces.expires < ?",
                (pair, expires, now),
            ).rowcount
            == 1
        )
        seen.add(pair)
    return answers


def prune_nonces(db: sqlite3.Connection, now: int) -> None:
    """Forget the nonces whose signatures could no longer be accepted anyway."""
    db.execute("DELETE FROM nonces WHERE expires < ?", (now,))
