"""The ledger, in SQLite: receipt chains and their countersignatures, the requests we routed
to peers, statements, equivocations and re-sync state."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence

import msgspec

from ledger.receipts import GENESIS, SentRequest
from node.storage.records import (
    ChainHeads,
    LinkedReceipt,
    ReceiptMaker,
    StoredReceipt,
    body_hash,
)
from node.storage.sqlite.connection import Database
from node.storage.sqlite.usage import SENT_COLUMNS

_RECEIPT_COLUMNS = "provider, consumer, seq, id, hash, amount, iat, body, csig, csig_sent"

_INSERT_RECEIPT = f"INSERT INTO receipts ({_RECEIPT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)"


class SqliteLedger:
    """Our copy of every receipt chain we are a party to, and what closes and checks them."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def issue_receipt(self, pair: tuple[str, str], make: ReceiptMaker) -> StoredReceipt:
        """Our receipt for a request served for a peer, next in the pair's chain (made by
        `make(seq, prev)`), committed before the answer completes: a chain never has a gap,
        whatever the crash. The request's usage record is journaled, not written here."""
        return (await self.issue_receipts([(pair, make)]))[0]

    async def issue_receipts(
        self, issued: Sequence[tuple[tuple[str, str], ReceiptMaker]]
    ) -> list[StoredReceipt]:
        """`issue_receipt` for several requests, in one transaction: one commit (the WAL
        frames of the chain's pages written once for all). The receipts' pages alone: with
        the usage record, its two indexes and the spend, a receipt wrote 9 pages, not 5, and
        cost a third more of the loop's time (the usage goes with the journal's batch)."""

        def write(db: sqlite3.Connection) -> list[StoredReceipt]:
            heads = ChainHeads()
            receipts = []
            for pair, make in issued:
                if pair not in heads:
                    last = db.execute(
                        "SELECT seq, body FROM receipts WHERE provider = ? AND consumer = ?"
                        " ORDER BY seq DESC LIMIT 1",
                        pair,
                    ).fetchone()
                    heads.seed(pair, last)
                receipt = heads.issue(pair, make)
                db.execute(_INSERT_RECEIPT, msgspec.structs.astuple(receipt))
                receipts.append(receipt)
            return receipts

        return await self._db.atomic(write, inline=True)

    async def add_receipts(
        self, receipts: list[LinkedReceipt]
    ) -> tuple[list[tuple[StoredReceipt, StoredReceipt]], list[tuple[StoredReceipt, str]]]:
        """Append receipts other nodes signed (verified by the caller), in one transaction:
        each new one is added, a known one gains the countersignature we lacked. Answers the
        pairs (held, offered) where the provider had signed a different receipt for that
        place in its chain (equivocation: the held one stays), and the receipts refused, with
        why: one that does not link with a neighbour we hold (its `prev` is not the hash of
        the receipt before, or the receipt after does not name it), or a second receipt for
        a request that has one already. Hashes are recomputed from the stored bodies, never
        read from the `hash` column."""

        def write(
            db: sqlite3.Connection,
        ) -> tuple[list[tuple[StoredReceipt, StoredReceipt]], list[tuple[StoredReceipt, str]]]:
            conflicts, refused = [], []
            for linked in receipts:
                held = _add_receipt(db, linked)
                if isinstance(held, str):
                    refused.append((linked.receipt, held))
                elif held is not None:
                    conflicts.append((held, linked.receipt))
            return conflicts, refused

        return await self._db.atomic(write)

    async def sent_requests(self, peer: str, ids: Sequence[str]) -> dict[str, SentRequest]:
        """What we recorded of the requests with these ids that we routed to `peer`."""
        found: dict[str, SentRequest] = {}
        for start in range(0, len(ids), 500):
            chunk = list(ids[start : start + 500])
            rows = await self._db.fetchall(
                f"SELECT {SENT_COLUMNS} FROM peer_requests"
                f" WHERE request_id IN ({','.join('?' * len(chunk))}) AND peer_id = ?",
                (*chunk, peer),
            )
            found.update((row[0], SentRequest(*row)) for row in rows)
        return found

    async def receipts_at(
        self, provider: str, consumer: str, seqs: Sequence[int]
    ) -> list[StoredReceipt]:
        """The receipts of one pair's chain at these places (those it has)."""
        if not seqs:
            return []
        rows = await self._db.fetchall(
            f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE provider = ? AND consumer = ?"
            f" AND seq IN ({','.join('?' * len(seqs))})",
            (provider, consumer, *seqs),
        )
        return [StoredReceipt(*row) for row in rows]

    async def add_countersignatures(
        self, provider: str, consumer: str, csigs: list[tuple[int, str]], *, to_send: bool = True
    ) -> int:
        """Countersignatures (seq, csig) for receipts that have none yet; how many were added."""
        sent = 0 if to_send else 1
        rows = [(csig, sent, provider, consumer, seq) for seq, csig in csigs]
        return await self._db.execute_many(
            "UPDATE receipts SET csig = ?, csig_sent = ?"
            " WHERE provider = ? AND consumer = ? AND seq = ? AND csig IS NULL",
            rows,
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
        rows = await self._db.fetchall(
            f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE provider = ? AND consumer = ?"
            " AND seq > ? ORDER BY seq LIMIT ?",
            (provider, consumer, after_seq, -1 if limit is None else limit),
        )
        return [StoredReceipt(*row) for row in rows]

    async def pending_resyncs(self, file_id: str, me: str) -> set[str]:
        """The peers whose chains must be re-synced before we issue them receipts. When this
        database is not the file we last ran on (`file_id` differs: a restored backup, a copy
        moved to another disk), or we have no note of that yet but have issued receipts,
        every peer is added: our chain heads may be older than what the peers hold."""

        def work(db: sqlite3.Connection) -> set[str]:
            row = db.execute("SELECT value FROM node_meta WHERE name = 'file_id'").fetchone()
            if row is None:
                issued = db.execute(
                    "SELECT 1 FROM receipts WHERE provider = ? LIMIT 1", (me,)
                ).fetchone()
                moved = issued is not None
            else:
                moved = row[0] != file_id
            if moved:
                db.execute("INSERT OR IGNORE INTO resync_pending SELECT node_id FROM peers")
            db.execute(
                "INSERT INTO node_meta (name, value) VALUES ('file_id', ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (file_id,),
            )
            return {r[0] for r in db.execute("SELECT peer_id FROM resync_pending")}

        return await self._db.atomic(work)

    async def resynced(self, peer: str) -> None:
        await self._db.execute("DELETE FROM resync_pending WHERE peer_id = ?", (peer,))

    async def chain_head(self, provider: str, consumer: str) -> StoredReceipt | None:
        """The last receipt of one pair's chain (highest seq), if any."""
        row = await self._db.fetchone(
            f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE provider = ? AND consumer = ?"
            " ORDER BY seq DESC LIMIT 1",
            (provider, consumer),
        )
        return StoredReceipt(*row) if row is not None else None

    async def receipt_pairs(self) -> list[tuple[str, str]]:
        rows = await self._db.fetchall("SELECT DISTINCT provider, consumer FROM receipts")
        return [(row[0], row[1]) for row in rows]

    async def receipts_since(self, since: int) -> list[StoredReceipt]:
        rows = await self._db.fetchall(
            f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE iat >= ?"
            " ORDER BY iat, provider, consumer, seq",
            (since,),
        )
        return [StoredReceipt(*row) for row in rows]

    async def unsent_countersignatures(
        self, consumer: str, provider: str, limit: int
    ) -> list[StoredReceipt]:
        rows = await self._db.fetchall(
            f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE consumer = ? AND provider = ?"
            " AND csig IS NOT NULL AND csig_sent = 0 ORDER BY seq LIMIT ?",
            (consumer, provider, limit),
        )
        return [StoredReceipt(*row) for row in rows]

    async def mark_countersignatures_sent(self, receipts: list[StoredReceipt]) -> None:
        await self._db.execute_many(
            "UPDATE receipts SET csig_sent = 1 WHERE provider = ? AND consumer = ? AND seq = ?",
            [(r.provider, r.consumer, r.seq) for r in receipts],
        )

    async def add_equivocation(
        self, provider: str, consumer: str, seq: int, ours: str, theirs: str
    ) -> None:
        await self._db.execute(
            "INSERT OR IGNORE INTO equivocations VALUES (?, ?, ?, ?, ?, ?)",
            (provider, consumer, seq, ours, theirs, int(time.time())),
        )

    async def add_settlement(self, a: str, b: str, to_seq: int, iat: int, body: str) -> bool:
        """Keep a statement; False if the pair has one issued at `iat` already."""
        added = await self._db.execute(
            "INSERT OR IGNORE INTO settlements VALUES (?, ?, ?, ?, ?)", (a, b, to_seq, iat, body)
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
            rows = await self._db.fetchall("SELECT body FROM settlements ORDER BY iat")
        else:
            rows = await self._db.fetchall(
                "SELECT body FROM settlements WHERE a = ? AND b = ? AND iat > ?"
                " ORDER BY iat LIMIT ?",
                (a, b, after_iat, -1 if limit is None else limit),
            )
        return [row[0] for row in rows]


def _prev_of(body: str) -> str | None:
    try:
        prev = msgspec.json.decode(body).get("prev")
    except (msgspec.DecodeError, AttributeError):
        return None
    return prev if isinstance(prev, str) else None


def _misfit(db: sqlite3.Connection, linked: LinkedReceipt) -> str | None:
    """Why a new receipt does not fit our copy of its chain, or None: its neighbours that we
    hold must link with it, and its request must not have a receipt already."""
    receipt = linked.receipt
    pair = (receipt.provider, receipt.consumer)
    twin = db.execute(
        "SELECT seq FROM receipts WHERE provider = ? AND consumer = ? AND id = ? LIMIT 1",
        (*pair, receipt.id),
    ).fetchone()
    if twin is not None:
        return f"request {receipt.id} has a receipt already (seq {twin[0]})"
    before = db.execute(
        "SELECT body FROM receipts WHERE provider = ? AND consumer = ? AND seq = ?",
        (*pair, receipt.seq - 1),
    ).fetchone()
    if before is not None and body_hash(before[0]) != linked.prev:
        return f"prev is not the hash of seq {receipt.seq - 1}"
    after = db.execute(
        "SELECT body FROM receipts WHERE provider = ? AND consumer = ? AND seq = ?",
        (*pair, receipt.seq + 1),
    ).fetchone()
    if after is not None and _prev_of(after[0]) != body_hash(receipt.body):
        return f"seq {receipt.seq + 1} does not link to it"
    return None


def _add_receipt(db: sqlite3.Connection, linked: LinkedReceipt) -> StoredReceipt | str | None:
    """See `LedgerStore.add_receipts`: the receipt held at that place if it differs, why the
    receipt is refused, or None (taken, or known already)."""
    receipt = linked.receipt
    place = (receipt.provider, receipt.consumer, receipt.seq)
    row = db.execute(
        f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE provider = ? AND consumer = ? AND seq = ?",
        place,
    ).fetchone()
    if row is None:
        if receipt.seq == 1 and linked.prev != GENESIS:
            return "seq 1 must start the chain"
        misfit = _misfit(db, linked)
        if misfit is not None:
            return misfit
        db.execute(_INSERT_RECEIPT, msgspec.structs.astuple(receipt))
        return None
    held = StoredReceipt(*row)
    if body_hash(held.body) != body_hash(receipt.body):
        return held
    if held.csig is None and receipt.csig is not None:
        db.execute(
            "UPDATE receipts SET csig = ? WHERE provider = ? AND consumer = ? AND seq = ?",
            (receipt.csig, *place),
        )
    return None
