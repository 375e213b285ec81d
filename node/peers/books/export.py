"""Our receipts as CSV or as the signed JSON (`aihub ledger export`). Apart because it
reads our own receipts only, as they are, and holds the export's columns."""

from __future__ import annotations

import csv
import io

import msgspec

from ledger.receipts import receipt_fields
from node.peers.receipts import loaded
from node.storage.base import Store

EXPORT_COLUMNS = (
    "iat",
    "provider",
    "consumer",
    "seq",
    "id",
    "model",
    "tokens_in",
    "tokens_out",
    "amount",
    "countersigned",
)


async def export(store: Store, since: int, fmt: str) -> str:
    """Receipts issued since `since` (unix seconds) as CSV or JSON (the signed receipts)."""
    rows = await store.ledger.receipts_since(since)
    receipts = [loaded(row) for row in rows]
    if fmt == "json":
        return msgspec.json.encode([receipt_fields(r) for r in receipts]).decode()
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(EXPORT_COLUMNS)
    for r in receipts:
        writer.writerow(
            [
                r.iat,
                r.provider,
                r.consumer,
                r.seq,
                r.id,
                r.model,
                r.tokens_in,
                r.tokens_out,
                r.amount,
                int(bool(r.csig)),
            ]
        )
    return out.getvalue()
