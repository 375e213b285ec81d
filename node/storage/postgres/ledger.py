"""The ledger, in PostgreSQL: receipt chains and their countersignatures, the requests we
routed to peers, statements, equivocations and re-sync state.

A chain's head is decided in the database: whoever adds to a pair's chain (a receipt we issue,
receipts a peer hands us) first takes the pair's advisory lock, held to its commit, so that
two processes issuing receipts for one pair queue for the head instead of forking the chain
(the primary key would refuse the second receipt at one seq; the lock makes it the next one).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import asyncpg
import msgspec

from ledger.receipts import GENESIS, SentRequest
from node.storage.postgres.connection import Database, lock_key
from node.storage.postgres.usage import SENT_COLUMNS
from node.storage.records import (
    ChainHeads,
    LinkedReceipt,
    ReceiptMaker,
    StoredReceipt,
    body_hash,
)

_RECEIPT_COLUMNS = "provider, consumer, seq, id, hash, amount, iat, body, csig, csig_sent"

_INSERT_RECEIPT = (
    f"INSERT INTO receipts ({_RECEIPT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
)


def _receipt(row: Sequence) -> StoredReceipt:
    return StoredReceipt(*row)


async def lock_chains(db: asyncpg.Connection, pairs: set[tuple[str, str]]) -> None:
    """Hold these pairs' chains until the transaction ends, taken in one order."""
    keys = sorted({lock_key("chain", provider, consumer) for provider, consumer in pairs})
    await db.execute("SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) k", keys)


class PostgresLedger:
    """Our copy of every receipt chain we are a party to, and what closes and checks them."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def issue_receipt(self, pair: tuple[str, str], make: ReceiptMaker) -> StoredReceipt:
        """Our receipt for a request served for a peer, next in the pair's chain (made by
        `make(seq, prev)`), in one transaction under the chain's lock: a chain never forks or
        has a gap, however many processes issue receipts for the pair. The request's usage
        record is journaled, not written here."""
        return (await self.issue_receipts([(pair, make)]))[0]

    async def issue_receipts(
        self, issued: Sequence[tuple[tuple[str, str], ReceiptMaker]]
    ) -> list[StoredReceipt]:
        """`issue_receipt` for several requests, in one transaction under all their chains'
        locks (taken in one order): one commit for all."""

        async def write(db: asyncpg.Connection) -> list[StoredReceipt]:
            await lock_chains(db, {pair for pair, _ in issued})
            heads = ChainHeads()
            receipts = []
            for pair, make in issued:
                if pair not in heads:
                    last = await db.fetchrow(
                        "SELECT seq, body FROM receipts WHERE provider = $1 AND consumer = $2"
                        " ORDER BY seq DESC LIMIT 1",
                        *pair,
                    )
                    heads.seed(pair, last)
                receipt = heads.issue(pair, make)
                await db.execute(_INSERT_RECEIPT, *msgspec.structs.astuple(receipt))
                receipts.append(receipt)
            return receipts

        return await self._db.atomic(write)

    async def add_receipts(
        self, receipts: list[LinkedReceipt]
    ) -> tuple[list[tuple[StoredReceipt, StoredReceipt]], list[tuple[StoredReceipt, str]]]:
        """Append receipts other nodes signed (verified by the caller), in one transaction
        under their chains' locks: see `LedgerStore.add_receipts`. Hashes are recomputed
        from the stored bodies, never read from the `hash` column."""

        async def write(
            db: asyncpg.Connection,
        ) -> tuple[list[tuple[StoredReceipt, StoredReceipt]], list[tuple[StoredReceipt, str]]]:
            conflicts, refused = [], []
            await lock_chains(db, {(r.receipt.provider, r.receipt.consumer) for r in receipts})
            for linked in receipts:
                held = await _add_receipt(db, linked)
                if isinstance(held, str):
                    refused.append((linked.receipt, held))
                elif held is not None:
                    conflicts.append((held, linked.receipt))
            return conflicts, refused

        if not receipts:
            return [], []
        return await self._db.atomic(write)

    async def sent_requests(self, peer: str, ids: Sequence[str]) -> dict[str, SentRequest]:
        """What we recorded of the requests with these ids that we routed to `peer`."""
        if not ids:
            return {}
        rows = await self._db.fetch(
            f"SELECT {SENT_COLUMNS} FROM peer_requests"
            " WHERE request_id = ANY($1::text[]) AND peer_id = $2",
            list(ids),
            peer,
        )
        return {row[0]: SentRequest(*row) for row in rows}

    async def receipts_at(
        self, provider: str, consumer: str, seqs: Sequence[int]
    ) -> list[StoredReceipt]:
        """The receipts of one pair's chain at these places (those it has)."""
        if not seqs:
            return []
        rows = await self._db.fetch(
            f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE provider = $1 AND consumer = $2"
            " AND seq = ANY($3::bigint[])",
            provider,
            consumer,
            list(seqs),
        )
        return [_receipt(row) for row in rows]

    async def add_countersignatures(
        self, provider: str, consumer: str, csigs: list[tuple[int, str]], *, to_send: bool = True
    ) -> int:
        """Countersignatures (seq, csig) for receipts that have none yet; how many were added.
        One statement: a seq named twice gets the first of its csigs."""
        if not csigs:
            return 0
        first: dict[int, str] = {}
        for seq, csig in csigs:
            first.setdefault(seq, csig)
        return await self._db.execute(
            "UPDATE receipts SET csig = given.csig, csig_sent = $5"
            " FROM unnest($3::bigint[], $4::text[]) AS given (seq, csig)"
            " WHERE provider = $1 AND consumer = $2 AND receipts.seq = given.seq"
            " AND receipts.csig IS NULL",
            provider,
            consumer,
            list(first),
            list(first.values()),
            0 if to_send else 1,
        )

    async def add_countersignature(self, provider: str, consumer: str, seq: int, csig: str) -> bool:
        return await self.add_countersignatures(provider, consumer, [(seq, csig)]) == 1

    async def receipts(
        self,
        provider: str,
        consumer: str,
        *,
        after_seq: int = 0,
        limit: int | None = None,
    ) -> list[StoredReceipt]:
        """One pair's chain in seq order, from after `after_seq` (a page if `limit`)."""
        rows = await self._db.fetch(
            f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE provider = $1 AND consumer = $2"
            " AND seq > $3 ORDER BY seq LIMIT $4",
            provider,
            consumer,
            after_seq,
            limit,
        )
        return [_receipt(row) for row in rows]

    async def pending_resyncs(self, file_id: str, me: str) -> set[str]:
        """The peers whose chains must be re-synced before we issue them receipts. When this
        database is not the one we last ran on (`file_id` differs: a restored dump), or we
        have no note of that yet but have issued receipts, every peer is added."""

        async def work(db: asyncpg.Connection) -> set[str]:
            await db.execute("LOCK TABLE node_meta IN SHARE ROW EXCLUSIVE MODE")
            noted = await db.fetchval("SELECT value FROM node_meta WHERE name = 'file_id'")
            if noted is None:
                issued = await db.fetchval("SELECT 1 FROM receipts WHERE provider = $1 LIMIT 1", me)
                moved = issued is not None
            else:
                moved = noted != file_id
            if moved:
                await db.execute(
                    "INSERT INTO resync_pending SELECT node_id FROM peers ON CONFLICT DO NOTHING"
                )
            await db.execute(
                "INSERT INTO node_meta (name, value) VALUES ('file_id', $1)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                file_id,
            )
            return {r[0] for r in await db.fetch("SELECT peer_id FROM resync_pending")}

        return await self._db.atomic(work)

    async def resynced(self, peer: str) -> None:
        await self._db.execute("DELETE FROM resync_pending WHERE peer_id = $1", peer)

    async def chain_head(self, provider: str, consumer: str) -> StoredReceipt | None:
        """The last receipt of one pair's chain (highest seq), if any."""
        row = await self._db.fetchrow(
            f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE provider = $1 AND consumer = $2"
            " ORDER BY seq DESC LIMIT 1",
            provider,
            consumer,
        )
        return _receipt(row) if row is not None else None

    async def receipt_pairs(self) -> list[tuple[str, str]]:
        rows = await self._db.fetch("SELECT DISTINCT provider, consumer FROM receipts")
        return [(row[0], row[1]) for row in rows]

    async def receipts_since(self, since: int) -> list[StoredReceipt]:
        rows = await self._db.fetch(
            f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE iat >= $1"
            " ORDER BY iat, provider, consumer, seq",
            since,
        )
        return [_receipt(row) for row in rows]

    async def unsent_countersignatures(
        self, consumer: str, provider: str, limit: int
    ) -> list[StoredReceipt]:
        rows = await self._db.fetch(
            f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE consumer = $1 AND provider = $2"
            " AND csig IS NOT NULL AND csig_sent = 0 ORDER BY seq LIMIT $3",
            consumer,
            provider,
            limit,
        )
        return [_receipt(row) for row in rows]

    async def mark_countersignatures_sent(self, receipts: list[StoredReceipt]) -> None:
        await self._db.execute_many(
            "UPDATE receipts SET csig_sent = 1 WHERE provider = $1 AND consumer = $2 AND seq = $3",
            sorted((r.provider, r.consumer, r.seq) for r in receipts),
        )

    async def add_equivocation(
        self, provider: str, consumer: str, seq: int, ours: str, theirs: str
    ) -> None:
        await self._db.execute(
            "INSERT INTO equivocations VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            provider,
            consumer,
            seq,
            ours,
            theirs,
            int(time.time()),
        )

    async def add_settlement(self, a: str, b: str, to_seq: int, iat: int, body: str) -> bool:
        """Keep a statement; False if the pair has one issued at `iat` already."""
        added = await self._db.execute(
            "INSERT INTO settlements VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            a,
            b,
            to_seq,
            iat,
            body,
        )
        return added == 1

    async def settlements(
        self,
        a: str | None = None,
        b: str | None = None,
        *,
        after_iat: int = -1,
        limit: int | None = None,
    ) -> list[str]:
        """Statements (JSON as signed by both), oldest first; of one pair if given,
        issued after `after_iat` (a page if `limit`)."""
        if a is None:
            rows = await self._db.fetch("SELECT body FROM settlements ORDER BY iat")
        else:
            rows = await self._db.fetch(
                "SELECT body FROM settlements WHERE a = $1 AND b = $2 AND iat > $3"
                " ORDER BY iat LIMIT $4",
                a,
                b,
                after_iat,
                limit,
            )
        return [row[0] for row in rows]


def _prev_of(body: str) -> str | None:
    try:
        prev = msgspec.json.decode(body).get("prev")
    except (msgspec.DecodeError, AttributeError):
        return None
    return prev if isinstance(prev, str) else None


async def _body_at(db: asyncpg.Connection, pair: tuple[str, str], seq: int) -> str | None:
    return await db.fetchval(
        "SELECT body FROM receipts WHERE provider = $1 AND consumer = $2 AND seq = $3",
        *pair,
        seq,
    )


async def _misfit(db: asyncpg.Connection, linked: LinkedReceipt) -> str | None:
    """Why a new receipt does not fit our copy of its chain, or None: its neighbours that we
    hold must link with it, and its request must not have a receipt already."""
    receipt = linked.receipt
    pair = (receipt.provider, receipt.consumer)
    twin = await db.fetchval(
        "SELECT seq FROM receipts WHERE provider = $1 AND consumer = $2 AND id = $3 LIMIT 1",
        *pair,
        receipt.id,
    )
    if twin is not None:
        return f"request {receipt.id} has a receipt already (seq {twin})"
    before = await _body_at(db, pair, receipt.seq - 1)
    if before is not None and body_hash(before) != linked.prev:
        return f"prev is not the hash of seq {receipt.seq - 1}"
    after = await _body_at(db, pair, receipt.seq + 1)
    if after is not None and _prev_of(after) != body_hash(receipt.body):
        return f"seq {receipt.seq + 1} does not link to it"
    return None


async def _add_receipt(db: asyncpg.Connection, linked: LinkedReceipt) -> StoredReceipt | str | None:
    """See `LedgerStore.add_receipts`: the receipt held at that place if it differs, why the
    receipt is refused, or None (taken, or known already)."""
    receipt = linked.receipt
    place = (receipt.provider, receipt.consumer, receipt.seq)
    row = await db.fetchrow(
        f"SELECT {_RECEIPT_COLUMNS} FROM receipts"
        " WHERE provider = $1 AND consumer = $2 AND seq = $3",
        *place,
    )
    if row is None:
        if receipt.seq == 1 and linked.prev != GENESIS:
            return "seq 1 must start the chain"
        misfit = await _misfit(db, linked)
        if misfit is not None:
            return misfit
        await db.execute(_INSERT_RECEIPT, *msgspec.structs.astuple(receipt))
        return None
    held = _receipt(row)
    if body_hash(held.body) != body_hash(receipt.body):
        return held
    if held.csig is None and receipt.csig is not None:
        await db.execute(
            "UPDATE receipts SET csig = $1 WHERE provider = $2 AND consumer = $3 AND seq = $4",
            receipt.csig,
            *place,
        )
    return None
