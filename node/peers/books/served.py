"""What we answer a peer about our books: pages of our chains and statements with it, and
the receipts it hands us (taken only as DESIGN.md's rule says). Apart because it is the
answering side, behind `/federation/receipts` and `/federation/settlements`."""

from __future__ import annotations

import logging

import msgspec

from federation.descriptors import public_key_of
from ledger.receipts import receipt_fields, verify_receipt
from ledger.records import RecordError
from node.errors import Kind
from node.peers.books.errors import BooksError
from node.peers.books.reconciliation import KeepReceipt
from node.peers.books.wire import PAGE, ReceiptBatch, ReceiptPage, StatementPage
from node.peers.receipts import admissible, loaded
from node.storage.base import Store

log = logging.getLogger("aihub.ledger")


async def receipts_page(
    store: Store, me: str, peer: str, provider: str, after_seq: int, limit: int = PAGE
) -> bytes:
    """A page of one of the two chains between us and `peer`, with countersignatures: up to
    `limit` receipts (at most `PAGE`, whatever is asked)."""
    if provider not in (me, peer):
        raise BooksError(Kind.REFUSED, "only the chains between us are shown")
    consumer = peer if provider == me else me
    size = max(1, min(limit, PAGE))
    rows = await store.ledger.receipts(provider, consumer, after_seq=after_seq, limit=size + 1)
    page = ReceiptPage([receipt_fields(loaded(row)) for row in rows[:size]], len(rows) > size)
    return msgspec.json.encode(page)


async def take_receipts(store: Store, me: str, peer: str, body: bytes, keep: KeepReceipt) -> int:
    """Receipts a peer found missing in our books (or with a countersignature we lack).
    Taken only as DESIGN.md's rule says: as their consumer, from `peer` as the provider
    that signed them, for requests we sent it (`admissible`); or our own receipts to `peer`
    coming back (signed by us, countersigned, if at all, by the peer). Anything else is
    refused and never stored, counted or countersigned."""
    try:
        batch = msgspec.json.decode(body, type=ReceiptBatch)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BooksError(Kind.INVALID_REQUEST, f"not a batch of receipts: {exc}") from exc
    if len(batch.receipts) > PAGE:
        raise BooksError(Kind.TOO_LARGE, f"at most {PAGE} receipts at once")
    ours, theirs = [], []
    for fields in batch.receipts:
        provider = fields.get("provider")
        try:
            if provider == me:
                ours.append(verify_receipt(fields, public_key_of(me), consumer=peer))
            else:
                theirs.append(verify_receipt(fields, public_key_of(peer), consumer=me))
        except (RecordError, ValueError) as exc:
            log.warning("refused a receipt from %s: %s", peer, exc)
    taken, refused = await admissible(store, me, peer, theirs)
    for receipt, why in refused:
        log.warning("refused receipt %r from %s: %s", receipt.id, peer, why)
    return sum([await keep(receipt) for receipt in [*ours, *taken]])


async def statements_page(store: Store, me: str, peer: str, after_iat: int) -> bytes:
    """The statements between us and `peer` issued after `after_iat`, oldest first, a page."""
    a, b = min(me, peer), max(me, peer)
    bodies = await store.ledger.settlements(a, b, after_iat=after_iat, limit=PAGE + 1)
    page = StatementPage([msgspec.json.decode(body) for body in bodies[:PAGE]], len(bodies) > PAGE)
    return msgspec.json.encode(page)
