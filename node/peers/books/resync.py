"""Our chain to a peer re-synced from the peer's copy after a restore, before we issue it
more receipts (what `node.peers.resync` runs, when it decides to). Apart because it walks our
own chain only, from our head on, and runs on the request path's schedule rather than an
admin's or the reconciliation's."""

from __future__ import annotations

import logging

import msgspec

from federation.descriptors import public_key_of
from ledger.chain import verify_chain
from ledger.receipts import GENESIS, Receipt, receipt_hash
from node.errors import Kind
from node.peers.books.errors import BooksError
from node.peers.books.link import REFUSALS, Link, answered, decoded
from node.peers.books.settlement import recover_statements
from node.peers.books.wire import ReceiptPage
from node.peers.receipts import loaded, stored
from node.storage.base import Store
from node.storage.records import LinkedReceipt

log = logging.getLogger("aihub.ledger")


class Resync(msgspec.Struct):
    peer: str
    receipts: int  # of our own chain to the peer, recovered from its copy
    statements: int
    head: int  # the seq our chain to the peer continues after


async def resync_with(store: Store, link: Link) -> Resync:
    """Learn the head of our chain to the peer from the peer's copy before we issue it more
    receipts: a node restored from a backup holds an older head, and issuing from there
    would sign a second receipt for a seq the peer holds (equivocation). The receipts it
    holds beyond our head carry our own signature, so they are ours whatever the peer is:
    each that links onto our head is kept, as are the statements we lack. A copy that stops
    linking ends the recovery there (and is named in the log). A peer that refuses to show
    its copy (an older node, or one that will not) is served from our head: it could as well
    show nothing, and a receipt it then holds twice only harms its own books."""
    me, peer = link.identity.node_id, link.peer.node_id
    last = await store.ledger.chain_head(me, peer)
    seq, prev = (0, GENESIS) if last is None else (last.seq, receipt_hash(loaded(last)))
    recovered = 0
    while True:
        response = await link.get(f"/federation/receipts?provider={me}&after_seq={seq}")
        if response.status_code in REFUSALS:
            log.warning("%s does not show its copy of our chain (%d)", peer, response.status_code)
            return Resync(peer, recovered, 0, seq)
        page = decoded(answered(response, "to show its receipts"), ReceiptPage)
        receipts = _receipts_of(page)
        report = verify_chain(
            receipts, public_key_of(me), public_key_of(peer), start_seq=seq + 1, start_prev=prev
        )
        good = receipts[: report.checked]
        if good:
            conflicts, refused = await store.ledger.add_receipts(
                [LinkedReceipt(stored(r), r.prev) for r in good]
            )
            if conflicts or refused:
                raise BooksError(Kind.CONFLICT, f"our chain to {peer} differs from the peer's copy")
            recovered += len(good)
            seq, prev = report.head
        if not report.ok:
            log.warning("the copy of our chain held by %s stops linking: %s", peer, report)
        if not report.ok or not page.more or not good:
            break
    statements = await recover_statements(store, link)
    return Resync(peer, recovered, statements, seq)


def _receipts_of(page: ReceiptPage) -> list[Receipt]:
    """The receipts of a page as far as each is a receipt at all (the chain check names
    what is wrong with the first that is not)."""
    receipts = []
    for fields in page.receipts:
        try:
            receipts.append(msgspec.convert(fields, Receipt))
        except msgspec.ValidationError:
            break
    return receipts
