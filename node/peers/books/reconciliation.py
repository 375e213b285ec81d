"""Reconciliation with a peer: both chains compared with the peer's copies a window of seqs
at a time, what we miss recovered (as the acceptance rule allows), what the peer misses
sent, every difference reported. Apart because it is the one exchange that walks both
chains on both sides, and its state (`_Tally`, `_Outbox`) is its own."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from federation.identity import NodeIdentity
from ledger.receipts import Receipt, countersign, receipt_fields
from ledger.reconcile import BUCKETS, Reconciliation, reconcile
from ledger.reconcile_pages import windows
from ledger.records import RecordError
from node.peers.books.errors import BooksError
from node.peers.books.link import Link, answered, decoded, link_to
from node.peers.books.period import stored_pages, unanswered_receipts
from node.peers.books.settlement import recover_statements
from node.peers.books.wire import PAGE, ReceiptBatch, ReceiptPage
from node.peers.receipts import admissible, loaded, record_equivocation, stored
from node.storage.base import Store

if TYPE_CHECKING:
    import httpx


log = logging.getLogger("aihub.ledger")


class Bucket(msgspec.Struct):
    count: int
    amount: int


class ReconcileReport(msgspec.Struct):
    peer: str
    matched: Bucket
    missing_ours: Bucket  # recovered from their signed copies
    missing_theirs: Bucket  # sent to them
    disputed: Bucket  # never countersigned
    mismatched: Bucket
    equivocation: Bucket
    rejected: Bucket  # refused: not signed right, not between us, or for no request of ours
    suspended: bool
    # Receipts we took that bill requests whose answers never reached us whole.
    unanswered: Bucket = msgspec.field(default_factory=lambda: Bucket(0, 0))
    statements_recovered: int = 0  # both-signed statements of ours the peer still held


# How a receipt taken from a peer joins our copy of its chain (the node's `Receipts.keep`):
# whether it is in the chain now. `served.take_receipts` takes one too.
KeepReceipt = Callable[[Receipt], Awaitable[bool]]


async def _their_pages(link: Link, provider: str, size: int) -> AsyncIterator[list[Receipt]]:
    """The peer's copy of one of our two chains, a page at a time (up to `size` receipts,
    which a node older than `limit` ignores: it answers pages of its own size). Its pages
    must move forward: one that does not end the chain, so a peer cannot keep us asking."""
    after = 0
    while True:
        page = decoded(
            answered(
                await link.get(
                    f"/federation/receipts?provider={provider}&after_seq={after}&limit={size}"
                ),
                "to show its receipts",
            ),
            ReceiptPage,
        )
        receipts = []
        for fields in page.receipts:
            try:
                receipts.append(msgspec.convert(fields, Receipt))
            except msgspec.ValidationError:
                continue  # reconcile would refuse it anyway; a bad one must not stop the rest
        yield receipts
        top = max((r.seq for r in receipts), default=after)
        if not page.more or top <= after:
            return
        after = top


async def _our_pages(
    store: Store, provider: str, consumer: str, size: int
) -> AsyncIterator[list[Receipt]]:
    """Our copy of one chain, a page at a time from the store, in seq order."""
    async for rows in stored_pages(store, provider, consumer, size):
        yield [loaded(row) for row in rows]


@dataclass
class _Tally:
    """A reconciliation's report as its windows add up: totals only, never the receipts."""

    buckets: dict[str, Bucket]
    unanswered: Bucket
    suspended: bool = False

    @classmethod
    def empty(cls) -> _Tally:
        return cls({name: Bucket(0, 0) for name in BUCKETS}, Bucket(0, 0))

    def add(self, name: str, extra: Bucket) -> None:
        self.buckets[name] = _sum(self.buckets[name], extra)

    def add_unanswered(self, receipts: list[Receipt]) -> None:
        self.unanswered = _sum(self.unanswered, _bucket(receipts))


@dataclass
class _Outbox:
    """Receipts to send the peer (`POST /federation/receipts`), in batches of `PAGE` as they
    are found, so that what waits to go is never more than a batch."""

    link: Link
    waiting: list[Receipt]

    async def add(self, receipts: list[Receipt]) -> None:
        self.waiting += receipts
        while len(self.waiting) >= PAGE:
            await self._send(self.waiting[:PAGE])
            self.waiting = self.waiting[PAGE:]

    async def flush(self) -> None:
        if self.waiting:
            await self._send(self.waiting)
            self.waiting = []

    async def _send(self, receipts: list[Receipt]) -> None:
        batch = ReceiptBatch([receipt_fields(r) for r in receipts])
        body = msgspec.json.encode(batch)
        answered(await self.link.post("/federation/receipts", body), "receipts")


async def reconcile_with(
    store: Store, link: Link, keep: KeepReceipt, *, page: int = PAGE
) -> ReconcileReport:
    """Compare both chains with the peer's copies; recover what we miss (from their signed
    copies), send what they miss, and report every difference. The chains are read page by
    page on both sides (`page` receipts at most) and compared a window of seqs at a time
    (`ledger.reconcile_pages`), so the memory it takes does not grow with the chains."""
    me, peer = link.identity.node_id, link.peer.node_id
    tally, outbox = _Tally.empty(), _Outbox(link, [])
    for provider, consumer in ((me, peer), (peer, me)):
        ours = _our_pages(store, provider, consumer, page)
        theirs = _their_pages(link, provider, page)
        async for window in windows((provider, consumer), ours, theirs):
            result = reconcile(window.ours, window.theirs, between=(me, peer))
            result.rejected += window.rejected
            await _settle_window(store, link, keep, result, tally, outbox)
    await outbox.flush()
    statements_recovered = await recover_statements(store, link)
    return ReconcileReport(
        peer=peer,
        suspended=tally.suspended,
        statements_recovered=statements_recovered,
        unanswered=tally.unanswered,
        **tally.buckets,
    )


async def _settle_window(
    store: Store,
    link: Link,
    keep: KeepReceipt,
    result: Reconciliation,
    tally: _Tally,
    outbox: _Outbox,
) -> None:
    """Act on one window's reconciliation and add it to the tally: keep what we recover
    (as the acceptance rule allows), take countersignatures, countersign what we owe,
    record equivocations, and queue what the peer misses."""
    me, peer = link.identity.node_id, link.peer.node_id
    recovered, refused = await _recoverable(store, link, result.missing_ours)
    for receipt in recovered:
        if not await keep(receipt):
            refused.append(receipt)
    for receipt in result.csig_for_ours:
        # The peer holds it countersigned already: nothing for us to send it.
        await store.ledger.add_countersignatures(
            receipt.provider, receipt.consumer, [(receipt.seq, receipt.csig)], to_send=False
        )
    signed = await _countersign_disputed(store, link, result.disputed)
    for equivocation in result.equivocation:
        await record_equivocation(store, stored(equivocation.first), stored(equivocation.second))
    # Our countersignatures of what we recovered or signed now go back with the rest.
    countersigned = [r for r in recovered if r.consumer == me and r not in refused]
    await outbox.add([*result.missing_theirs, *result.csig_for_theirs, *signed, *countersigned])
    for name, totals in result.totals().items():
        if name not in ("missing_ours", "rejected"):
            tally.add(name, Bucket(*totals))
    taken = [r for r in recovered if r not in refused]
    tally.add("missing_ours", _bucket(taken))
    tally.add("rejected", _bucket([*(x.receipt for x in result.rejected), *refused]))
    counted = [*taken, *(r for r in result.matched if r.consumer == me), *signed]
    tally.add_unanswered(await unanswered_receipts(store, peer, counted))
    tally.suspended |= any(e.provider == peer for e in result.equivocation)


def _bucket(receipts: list[Receipt]) -> Bucket:
    return Bucket(len(receipts), sum(r.amount for r in receipts))


def _sum(one: Bucket, other: Bucket) -> Bucket:
    return Bucket(one.count + other.count, one.amount + other.amount)


async def _recoverable(
    store: Store, link: Link, missing: list[Receipt]
) -> tuple[list[Receipt], list[Receipt]]:
    """Of the receipts only the peer holds, those we may take back into our books, with our
    countersignature where we are the consumer (a receipt lost in a crash is recovered
    countersigned, not left disputed), and those refused: a receipt of theirs for a
    request we never sent them, or not as we asked and priced it, is never taken."""
    me, peer = link.identity.node_id, link.peer.node_id
    own = [r for r in missing if r.provider == me]
    taken, refused = await admissible(store, me, peer, [r for r in missing if r.provider == peer])
    for receipt, why in refused:
        log.warning("reconciliation: refused receipt %r of %s: %s", receipt.id, peer, why)
    signed = [r if r.csig else countersign(r, link.identity.sign) for r in taken]
    return [*own, *signed], [r for r, _ in refused]


async def _countersign_disputed(store: Store, link: Link, disputed: list[Receipt]) -> list[Receipt]:
    """Receipts both sides hold and neither countersigned (say, taken before a crash, or
    without our signature): countersigned now where we are their consumer and they bill a
    request we sent; the countersigned copies, to send back."""
    me, peer = link.identity.node_id, link.peer.node_id
    taken, _ = await admissible(store, me, peer, [r for r in disputed if r.consumer == me])
    signed = [countersign(r, link.identity.sign) for r in taken]
    for receipt in signed:
        await store.ledger.add_countersignature(receipt.provider, me, receipt.seq, receipt.csig)
    return signed


async def reconcile_all(
    store: Store, identity: NodeIdentity, client: httpx.AsyncClient, keep: KeepReceipt
) -> list[ReconcileReport]:
    """Reconcile with every active peer we hold a key from (on a schedule); a peer that does
    not answer is tried again next time."""
    import httpx

    reports = []
    for record in await store.peers.peers():
        if record.status != "active":
            continue  # the side that only provides holds no key of the peer's: it signs
        try:
            link = await link_to(store, identity, client, record.node_id)
            reports.append(await reconcile_with(store, link, keep))
        except (BooksError, httpx.HTTPError, RecordError) as exc:
            log.info("reconciliation with %s failed: %s", record.name, exc)
    return reports
