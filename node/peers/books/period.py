"""Our books with one peer since the last settlement statement: where the last statement
leaves each chain (`coverage`), both chains after it (`Pair`, whole; `OpenPeriod`, a page at a
time), and the store read a page at a time (`stored_pages`). Apart because balances,
verification, reconciliation and settlement all start from here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from ledger.receipts import GENESIS, Receipt
from ledger.records import MAX_SKEW
from ledger.settlement import Period, Statement, open_periods, parse_statement, period_statement
from node.errors import Kind
from node.peers.books.errors import BooksError
from node.peers.books.wire import PAGE
from node.peers.receipts import admissible, loaded, sent_to
from node.storage.base import Store
from node.storage.records import StoredReceipt, body_hash


@dataclass
class _Between:
    """Us and one peer, and the two sides as the pair's statements name them: `a` the lower
    node id, `b` the higher."""

    me: str
    peer: str

    @property
    def a(self) -> str:
        return min(self.me, self.peer)

    @property
    def b(self) -> str:
        return max(self.me, self.peer)


@dataclass
class Pair(_Between):
    """Our books with one peer: the two chains, from after the last settlement, whole (to
    look at its receipts; the node itself reads a period a page at a time: `open_period`)."""

    previous: Statement | None
    ours: list[Receipt]  # we provided (me -> peer)
    theirs: list[Receipt]  # they provided (peer -> me)

    def a_to_b(self) -> list[Receipt]:
        return self.ours if self.me == self.a else self.theirs

    def b_to_a(self) -> list[Receipt]:
        return self.theirs if self.me == self.a else self.ours


async def last_statement(store: Store, me: str, peer: str) -> Statement | None:
    """The pair's statement that covers the most of its chains (not the newest by `iat`:
    the two nodes' clocks differ, and a statement out of order must not reopen a period)."""
    return (await coverage(store, me, peer))[0]


async def coverage(store: Store, me: str, peer: str) -> tuple[Statement | None, dict[str, int]]:
    """The last statement, and the highest seq of each chain the statements cover, by
    provider. The chains are read a page at a time, never whole."""
    a, b = min(me, peer), max(me, peer)
    statements = [parse_statement(body) for body in await store.ledger.settlements(a, b)]
    if not statements:
        return None, {a: 0, b: 0}
    settled = await settled_seqs(store, a, b, statements)
    covered = [((s.to_seq, seq, s.iat), s) for s, seq in zip(statements, settled, strict=True)]
    (ab_seq, ba_seq, _), statement = max(covered, key=lambda item: item[0])
    return statement, {a: ab_seq, b: ba_seq}


async def settled_seqs(store: Store, a: str, b: str, statements: list[Statement]) -> list[int]:
    """The seq of the b→a receipt each statement's head names (the format gives that
    chain's range by hash only). The hash is recomputed from each body; if no receipt we
    hold has it (a damaged or moved head, which `verify` names), the receipts issued before
    the statement, allowing for clock skew, count as covered: a period is never counted
    twice. One pass over the chain for the heads, a second only for heads not found."""
    heads = {s.head_b_to_a for s in statements} - {GENESIS}
    found: dict[str, int] = {GENESIS: 0}
    if heads:
        async for rows in stored_pages(store, b, a):
            for row in rows:
                digest = body_hash(row.body)
                if digest in heads:
                    found.setdefault(digest, row.seq)
            if heads <= found.keys():
                break
    lost = [s for s in statements if s.head_b_to_a not in found]
    issued: dict[int, int] = dict.fromkeys((s.iat + MAX_SKEW for s in lost), 0)
    if issued:
        async for rows in stored_pages(store, b, a):
            for row in rows:
                for bound, seq in issued.items():
                    if row.iat <= bound and row.seq > seq:
                        issued[bound] = row.seq
    return [
        found[s.head_b_to_a] if s.head_b_to_a in found else issued[s.iat + MAX_SKEW]
        for s in statements
    ]


async def stored_pages(
    store: Store, provider: str, consumer: str, size: int = PAGE, *, after: int = 0
) -> AsyncIterator[list[StoredReceipt]]:
    """One chain as stored after seq `after`, a page at a time, in seq order."""
    while True:
        rows = await store.ledger.receipts(provider, consumer, after_seq=after, limit=size)
        if not rows:
            return
        yield rows
        after = rows[-1].seq


async def open_pair(store: Store, me: str, peer: str) -> Pair:
    previous, settled = await coverage(store, me, peer)

    async def after(provider: str, consumer: str) -> list[Receipt]:
        rows = await store.ledger.receipts(provider, consumer, after_seq=settled[provider])
        return [loaded(row) for row in rows]

    return Pair(me, peer, previous, await after(me, peer), await after(peer, me))


@dataclass
class OpenPeriod(_Between):
    """Our books with one peer since the last statement, read a page at a time and never
    whole: each chain's period (`ledger.settlement.Period`: its totals and head), the first
    break in a chain, and the receipts of the peer's that bill no request we sent."""

    previous: Statement | None
    a_to_b: Period
    b_to_a: Period
    broken: str | None = None
    unbilled: int = 0
    first_unbilled: tuple[int, str] | None = None  # (seq, why)

    @property
    def empty(self) -> bool:
        return self.a_to_b.count == 0 and self.b_to_a.count == 0

    def statement(self, now: float | None = None) -> Statement:
        """The unsigned statement of the period; ValueError if our chains are not in order."""
        if self.broken is not None:
            raise ValueError(self.broken)
        return period_statement(self.a_to_b, self.b_to_a, self.a, self.b, now=now)

    def check_billed(self) -> None:
        """A statement is signed only over amounts we can match, receipt by receipt, to
        requests we sent the peer, as we asked and priced them (receipts in our books from
        before that rule was kept, or put there by hand, stop the settlement: they are for
        an admin)."""
        if self.first_unbilled is not None:
            seq, why = self.first_unbilled
            raise BooksError(
                Kind.CONFLICT,
                f"our books hold {self.unbilled} receipt(s) of this peer that bill no request"
                f" of ours as sent (seq {seq}: {why})",
            )


async def open_period(store: Store, me: str, peer: str, *, page: int = PAGE) -> OpenPeriod:
    """Both chains since the last statement, a page (`page` receipts) at a time: each page
    added to its chain's period, and the peer's receipts checked against the requests we
    sent."""
    previous, settled = await coverage(store, me, peer)
    a, b = min(me, peer), max(me, peer)
    try:
        a_to_b, b_to_a = open_periods(a, b, previous=previous)
    except ValueError as exc:
        raise BooksError(Kind.CONFLICT, f"our statements with this peer: {exc}") from exc
    period = OpenPeriod(me, peer, previous, a_to_b, b_to_a)
    for provider, consumer, chain in ((a, b, a_to_b), (b, a, b_to_a)):
        pages = stored_pages(store, provider, consumer, page, after=settled[provider])
        async for rows in pages:
            receipts = [loaded(row) for row in rows]
            if period.broken is None:
                try:
                    chain.add(receipts)
                except ValueError as exc:
                    period.broken = str(exc)
            if provider == peer:
                _, refused = await admissible(store, me, peer, receipts, signatures_checked=True)
                period.unbilled += len(refused)
                if refused and period.first_unbilled is None:
                    period.first_unbilled = (refused[0][0].seq, refused[0][1])
    return period


async def unanswered_receipts(store: Store, peer: str, receipts: list[Receipt]) -> list[Receipt]:
    """Receipts that bill us for requests whose answer never reached us whole (our usage
    record says the request did not end with a 200): we owe them, and it shows."""
    theirs = [r for r in receipts if r.provider == peer]
    sent = await sent_to(store, peer, theirs)
    return [r for r in theirs if r.id in sent and sent[r.id].status != 200]
