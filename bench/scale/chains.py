"""Long receipt chains written straight into a node's SQLite store, fast: for measuring what
reconciling a pair costs at a million receipts (`bench/scale/reconcile.py`) and for the
memory test of paged reconciliation (`tests/test_ledger_pages_nodes.py`).

Signing a receipt costs far more than anything reconciliation does with a copy both sides
hold countersigned (it compares hashes and verifies nothing), so these receipts carry
placeholder signatures: each body is the canonical JSON the ledger would store, built from a
template, and its hash and the chain's `prev` links are real. `chain` checks its template
against the ledger's own encoding on the first receipt, so the two cannot drift apart.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import msgspec

from ledger.canonical import b64url
from ledger.receipts import GENESIS, Receipt
from node.peers.receipts import loaded, stored
from node.storage.records import StoredReceipt

PLACEHOLDER_SIG = "A" * 86  # the length of an Ed25519 signature in base64url
IAT = 1_800_000_000
# The canonical encoding of a receipt: keys sorted, no spaces (ledger/canonical.py).
BODY = (
    '{{"amount":{amount},"consumer":"{consumer}","iat":{iat},"id":"{id}","key_id":"k-bench",'
    '"model":"scale-echo","prev":"{prev}","price_seq":1,"provider":"{provider}","seq":{seq},'
    '"sig":"{sig}","tokens_in":{tokens_in},"tokens_out":{tokens_out},"v":1}}'
)


def chain(provider: str, consumer: str, count: int) -> Iterator[StoredReceipt]:
    """`count` receipts of the chain provider → consumer, countersigned (placeholders)."""
    prev = GENESIS
    for seq in range(1, count + 1):
        fields = {
            "amount": 10 + seq % 7,
            "consumer": consumer,
            "iat": IAT + seq,
            "id": f"req-bench-{seq}",
            "prev": prev,
            "provider": provider,
            "seq": seq,
            "sig": PLACEHOLDER_SIG,
            "tokens_in": seq % 100,
            "tokens_out": seq % 50,
        }
        body = BODY.format(**fields)
        digest = b64url(hashlib.sha256(body.encode()).digest())
        row = StoredReceipt(
            provider, consumer, seq, fields["id"], digest, fields["amount"], IAT + seq, body,
            csig=PLACEHOLDER_SIG, csig_sent=1,
        )  # fmt: skip
        if seq == 1:
            _check_template(row)
        prev = digest
        yield row


def _check_template(row: StoredReceipt) -> None:
    receipt: Receipt = loaded(row)
    again = stored(receipt)
    if (again.body, again.hash) != (row.body, row.hash):
        raise AssertionError("bench/scale/chains.py's template is not the ledger's encoding")


def write(database: Path, rows: Iterable[StoredReceipt], batch: int = 10_000) -> int:
    """Append rows to the `receipts` table of a node's SQLite file (migrated), in batches;
    how many."""
    written = 0
    # The columns in StoredReceipt's order.
    columns = "provider, consumer, seq, id, hash, amount, iat, body, csig, csig_sent"
    with contextlib.closing(sqlite3.connect(database)) as db:
        rows = iter(rows)
        while part := list(islice(rows, batch)):
            db.executemany(
                f"INSERT INTO receipts ({columns}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                [msgspec.structs.astuple(r) for r in part],
            )
            written += len(part)
        db.commit()
        # Into the main file (the node runs in WAL mode), so that a copy of it holds them.
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return written
