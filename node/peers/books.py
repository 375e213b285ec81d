"""The node's books with its peers: balances, verification, reconciliation, settlement,
netting and export. Shared by `aihub ledger …` (on the data folder) and the admin API (in the
running node); both talk to peers with signed requests.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import msgspec

from federation.descriptors import NodeDescriptor, public_key_of
from federation.identity import NodeIdentity
from federation.sealing import unseal
from ledger.chain import verify_chain
from ledger.nesting import bounded
from ledger.netting import Transfer, transfer_plan
from ledger.receipts import (
    GENESIS,
    Receipt,
    countersign,
    receipt_fields,
    receipt_hash,
    verify_receipt,
)
from ledger.reconcile import BUCKETS, Reconciliation, reconcile
from ledger.reconcile_pages import windows
from ledger.records import MAX_SKEW, RecordError, verify_fields
from ledger.settlement import (
    Period,
    Statement,
    balances,
    open_periods,
    parse_statement,
    period_statement,
    same_statement,
    sign_statement,
    verify_statement,
)
from node.errors import HubError, Kind
from node.peers import audit
from node.peers.receipts import (
    admissible,
    loaded,
    record_equivocation,
    sent_to,
    stored,
)
from node.storage.base import Store
from node.storage.records import LinkedReceipt, PeerRecord, StoredReceipt, body_hash

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("aihub.ledger")

PAGE = 1000  # receipts per page when two nodes compare their books
MAX_ANSWER = 8 * 1024 * 1024  # a page of 1000 receipts with countersignatures is ~1 MB
ANSWER_DEADLINE = 60.0  # seconds for one whole answer of a peer
# A peer's answers that mean "not shown to you" (not "try again"): an older node without the
# endpoint, or one that does not take our signature alone.
REFUSALS = (401, 403, 404)
KeepReceipt = Callable[[Receipt], Awaitable[bool]]
T = TypeVar("T")


class BooksError(HubError):
    """What stops a ledger operation, said plainly; an OpenAI-shaped error where it reaches
    the HTTP API (admin or federation), a plain message in the CLI."""

    def __init__(self, kind: Kind, message: str) -> None:
        super().__init__(kind, message, code="ledger_error")


# --- wire types between nodes ---------------------------------------------------------------


class ReceiptPage(msgspec.Struct):
    receipts: list[dict[str, object]]
    more: bool


class ReceiptBatch(msgspec.Struct):
    receipts: list[dict[str, object]]


class StatementBody(msgspec.Struct):
    statement: dict[str, object]
    # The proposer's last statement of the pair: a peer that lost it (say, to a restored
    # backup) keeps it first, since it carries the peer's own signature.
    previous: dict[str, object] | None = None


class StatementPage(msgspec.Struct):
    statements: list[dict[str, object]]
    more: bool


# --- views ----------------------------------------------------------------------------------


class PairBalance(msgspec.Struct):
    """What one peer and we used of each other since our last settlement (micro-units)."""

    peer: str
    name: str
    we_used: int  # served by them: we owe it
    they_used: int  # served by us: they owe it
    net: int  # positive: they owe us
    receipts: int
    # Of `we_used`: billed for requests whose answers never reached us whole.
    unanswered: int = 0


class ChainCheck(msgspec.Struct):
    """One chain (provider → consumer), or one settlement statement (`kind`; then provider
    and consumer are its `a` and `b`, and `receipts` those of its period)."""

    provider: str
    consumer: str
    receipts: int
    ok: bool
    problem: str | None
    kind: str = "chain"


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


class NetPlan(msgspec.Struct):
    balances: dict[str, int]
    transfers: list[Transfer]


# --- a pair's chains --------------------------------------------------------------------------


@dataclass
class Pair:
    """Our books with one peer: the two chains, from after the last settlement, whole (to
    look at its receipts; the node itself reads a period a page at a time: `open_period`)."""

    me: str
    peer: str
    previous: Statement | None
    ours: list[Receipt]  # we provided (me -> peer)
    theirs: list[Receipt]  # they provided (peer -> me)

    @property
    def a(self) -> str:
        return min(self.me, self.peer)

    @property
    def b(self) -> str:
        return max(self.me, self.peer)

    def a_to_b(self) -> list[Receipt]:
        return self.ours if self.me == self.a else self.theirs

    def b_to_a(self) -> list[Receipt]:
        return self.theirs if self.me == self.a else self.ours


async def last_statement(store: Store, me: str, peer: str) -> Statement | None:
    """The pair's statement that covers the most of its chains (not the newest by `iat`:
    the two nodes' clocks differ, and a statement out of order must not reopen a period)."""
    return (await _coverage(store, me, peer))[0]


async def _coverage(store: Store, me: str, peer: str) -> tuple[Statement | None, dict[str, int]]:
    """The last statement, and the highest seq of each chain the statements cover, by
    provider. The chains are read a page at a time, never whole."""
    a, b = min(me, peer), max(me, peer)
    statements = [parse_statement(body) for body in await store.ledger.settlements(a, b)]
    if not statements:
        return None, {a: 0, b: 0}
    settled = await _settled_seqs(store, a, b, statements)
    covered = [((s.to_seq, seq, s.iat), s) for s, seq in zip(statements, settled, strict=True)]
    (ab_seq, ba_seq, _), statement = max(covered, key=lambda item: item[0])
    return statement, {a: ab_seq, b: ba_seq}


async def _settled_seqs(store: Store, a: str, b: str, statements: list[Statement]) -> list[int]:
    """The seq of the b→a receipt each statement's head names (the format gives that
    chain's range by hash only). The hash is recomputed from each body; if no receipt we
    hold has it (a damaged or moved head, which `verify` names), the receipts issued before
    the statement, allowing for clock skew, count as covered: a period is never counted
    twice. One pass over the chain for the heads, a second only for heads not found."""
    heads = {s.head_b_to_a for s in statements} - {GENESIS}
    found: dict[str, int] = {GENESIS: 0}
    if heads:
        async for rows in _stored_pages(store, b, a):
            for row in rows:
                digest = body_hash(row.body)
                if digest in heads:
                    found.setdefault(digest, row.seq)
            if heads <= found.keys():
                break
    lost = [s for s in statements if s.head_b_to_a not in found]
    issued: dict[int, int] = dict.fromkeys((s.iat + MAX_SKEW for s in lost), 0)
    if issued:
        async for rows in _stored_pages(store, b, a):
            for row in rows:
                for bound, seq in issued.items():
                    if row.iat <= bound and row.seq > seq:
                        issued[bound] = row.seq
    return [
        found[s.head_b_to_a] if s.head_b_to_a in found else issued[s.iat + MAX_SKEW]
        for s in statements
    ]


async def _stored_pages(
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
    previous, settled = await _coverage(store, me, peer)

    async def after(provider: str, consumer: str) -> list[Receipt]:
        rows = await store.ledger.receipts(provider, consumer, after_seq=settled[provider])
        return [loaded(row) for row in rows]

    return Pair(me, peer, previous, await after(me, peer), await after(peer, me))


@dataclass
class OpenPeriod:
    """Our books with one peer since the last statement, read a page at a time and never
    whole: each chain's period (`ledger.settlement.Period`: its totals and head), the first
    break in a chain, and the receipts of the peer's that bill no request we sent."""

    me: str
    peer: str
    previous: Statement | None
    a_to_b: Period
    b_to_a: Period
    broken: str | None = None
    unbilled: int = 0
    first_unbilled: tuple[int, str] | None = None  # (seq, why)

    @property
    def a(self) -> str:
        return min(self.me, self.peer)

    @property
    def b(self) -> str:
        return max(self.me, self.peer)

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
    previous, settled = await _coverage(store, me, peer)
    a, b = min(me, peer), max(me, peer)
    try:
        a_to_b, b_to_a = open_periods(a, b, previous=previous)
    except ValueError as exc:
        raise BooksError(Kind.CONFLICT, f"our statements with this peer: {exc}") from exc
    period = OpenPeriod(me, peer, previous, a_to_b, b_to_a)
    for provider, consumer, chain in ((a, b, a_to_b), (b, a, b_to_a)):
        pages = _stored_pages(store, provider, consumer, page, after=settled[provider])
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


async def _peer_ids(store: Store, me: str) -> dict[str, str]:
    """Every node we keep books with, by id, with its name."""
    names = {p.node_id: p.name for p in await store.peers.peers(include_revoked=True)}
    for provider, consumer in await store.ledger.receipt_pairs():
        other = consumer if provider == me else provider
        names.setdefault(other, other[:20] + "…")
    return names


# --- balance, verify, export ------------------------------------------------------------------


async def balance(store: Store, me: str) -> list[PairBalance]:
    return [
        await _balance_with(store, me, peer, name)
        for peer, name in (await _peer_ids(store, me)).items()
    ]


async def _balance_with(store: Store, me: str, peer: str, name: str) -> PairBalance:
    """What each side used since the last statement, summed a page at a time."""
    _, settled = await _coverage(store, me, peer)
    used = {me: 0, peer: 0}  # by provider
    count = unanswered = 0
    for provider, consumer in ((me, peer), (peer, me)):
        async for rows in _stored_pages(store, provider, consumer, after=settled[provider]):
            receipts = [loaded(row) for row in rows]
            used[provider] += sum(r.amount for r in receipts)
            count += len(receipts)
            if provider == peer:
                unanswered += sum(r.amount for r in await _unanswered(store, peer, receipts))
    we_used, they_used = used[peer], used[me]
    return PairBalance(peer, name, we_used, they_used, they_used - we_used, count, unanswered)


async def verify(store: Store) -> list[ChainCheck]:
    """Every signature and every link of every chain we hold, the first broken link of each;
    then every settlement statement: both signatures, and its heads and totals against the
    receipts of its period in our chains."""
    checks = [
        await _check_chain(store, provider, consumer)
        for provider, consumer in sorted(await store.ledger.receipt_pairs())
    ]
    pairs = {tuple(sorted(pair)) for pair in await store.ledger.receipt_pairs()}
    for body in await store.ledger.settlements():
        try:
            statement = parse_statement(body)
        except RecordError:
            continue  # named below, under its pair, if it is one of ours
        pairs.add((statement.a, statement.b))
    for a, b in sorted(pairs):
        checks += await _verify_statements(store, a, b)
    return checks


async def _check_chain(store: Store, provider: str, consumer: str) -> ChainCheck:
    """One chain, a page at a time, each page checked to continue the last. What is named,
    as for the whole chain at once: a receipt that cannot be read, else the first broken
    link, else the first row whose `hash` column is not its body's."""
    count, head = 0, (0, GENESIS)
    unreadable = broken = column = None
    keys = public_key_of(provider), public_key_of(consumer)
    async for rows in _stored_pages(store, provider, consumer):
        offset, count = count, count + len(rows)
        if unreadable is not None:
            continue  # counted, not checked: the chain is not in order past it anyway
        try:
            receipts = [loaded(row) for row in rows]
        except RecordError as exc:
            unreadable = f"unreadable: {exc}"
            continue
        if broken is None:
            report = verify_chain(receipts, *keys, start_seq=head[0] + 1, start_prev=head[1])
            if report.ok:
                head = report.head
            else:
                broken = str(dataclasses.replace(report, index=offset + (report.index or 0)))
        column = column or _hash_column_problem(rows)
    problem = unreadable or broken or column
    return ChainCheck(provider, consumer, count, problem is None, problem)


def _hash_column_problem(rows: list[StoredReceipt]) -> str | None:
    """The `hash` column is derived from the body: name a row where it is not (the chain
    itself is checked from the bodies, and links are always recomputed from them)."""
    for row in rows:
        if row.hash != body_hash(row.body):
            return f"seq {row.seq}: the stored hash column is not the hash of its receipt"
    return None


async def _verify_statements(store: Store, a: str, b: str) -> list[ChainCheck]:
    """Each statement of the pair (a, b), in the order they cover the chains: both
    signatures, and exactly the totals and heads our receipts of its period give (read a
    page at a time)."""
    checks, statements = [], []
    for body in await store.ledger.settlements(a, b):
        try:
            statement = parse_statement(body)
            verify_statement(statement, public_key_of(a), public_key_of(b))
        except RecordError as exc:
            checks.append(ChainCheck(a, b, 0, False, f"a statement: {exc}", kind="statement"))
            continue
        statements.append(statement)
    settled = await _settled_seqs(store, a, b, statements)
    valid = [(s.to_seq, seq, s.iat, s) for s, seq in zip(statements, settled, strict=True)]
    previous: Statement | None = None
    ab_from = ba_from = 0
    for ab_to, ba_to, _, statement in sorted(valid, key=lambda item: item[:3]):
        span = Span((ab_from, ab_to), (ba_from, ba_to))
        problem, count = await _check_period(store, statement, previous, span)
        checks.append(ChainCheck(a, b, count, problem is None, problem, kind="statement"))
        previous, ab_from, ba_from = statement, ab_to, ba_to
    return checks


async def _check_period(
    store: Store, statement: Statement, previous: Statement | None, span: Span
) -> tuple[str | None, int]:
    """What is wrong with one statement against our receipts of its period, if anything,
    and how many receipts the period holds."""
    a, b = statement.a, statement.b
    count, broken = 0, None
    try:
        a_to_b, b_to_a = open_periods(a, b, previous=previous)
    except ValueError as exc:
        where = f"statement of seq {statement.from_seq}..{statement.to_seq}"
        return f"{where}: cannot check the statement: {exc}", 0
    for provider, consumer, period, (after, upto) in (
        (a, b, a_to_b, span.a_to_b),
        (b, a, b_to_a, span.b_to_a),
    ):
        async for rows in _stored_pages(store, provider, consumer, after=after):
            inside = [row for row in rows if row.seq <= upto]
            count += len(inside)
            if broken is None:
                try:
                    period.add([loaded(row) for row in inside])
                except (ValueError, RecordError) as exc:
                    broken = str(exc)
            if rows[-1].seq >= upto:
                break
    try:
        if broken is not None:
            raise ValueError(broken)
        same_statement(statement, period_statement(a_to_b, b_to_a, a, b, now=statement.iat))
        return None, count
    except ValueError as exc:
        problem = f"cannot check the statement: {exc}"
    except RecordError as exc:
        problem = str(exc)
    return f"statement of seq {statement.from_seq}..{statement.to_seq}: {problem}", count


class Span(NamedTuple):
    """A statement's period: the seqs (after, up to) of each chain it covers."""

    a_to_b: tuple[int, int]
    b_to_a: tuple[int, int]


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


# --- talking to a peer ------------------------------------------------------------------------


@dataclass
class Link:
    """What it takes to ask a peer about our books: its URL and the key it issued us."""

    identity: NodeIdentity
    client: httpx.AsyncClient
    peer: PeerRecord
    url: str
    key: str | None

    async def get(self, path: str) -> PeerAnswer:
        return await self._ask("GET", path)

    async def post(self, path: str, body: bytes) -> PeerAnswer:
        return await self._ask("POST", path, body)

    async def _ask(self, method: str, path: str, body: bytes = b"") -> PeerAnswer:
        """A signed request to the peer; its answer read up to `MAX_ANSWER` bytes (decoded)
        within `ANSWER_DEADLINE`: a peer that sends without end, or drips, is cut off."""
        # Imported here: `aihub ledger balance` reads the books without the peer transport
        # (request signatures parse URLs with httpx; peering brings aiohttp).
        from federation.transport import signed_headers
        from node.peers.peering import PEER_TIMEOUT

        url = self.url + path
        headers = signed_headers(self.identity, method, url, body, key=self.key)
        try:
            async with asyncio.timeout(ANSWER_DEADLINE):
                request = self.client.stream(
                    method, url, content=body, headers=headers, timeout=PEER_TIMEOUT
                )
                async with request as response:
                    return PeerAnswer(response.status_code, await _bounded(response))
        except TimeoutError as exc:
            raise BooksError(
                Kind.PEER_TIMEOUT, f"the peer took over {ANSWER_DEADLINE:.0f} s to answer"
            ) from exc


@dataclass(frozen=True)
class PeerAnswer:
    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        """The start of the answer, fit to print: the peer chose every byte of it."""
        text = self.content[:300].decode("utf-8", "replace")
        return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


async def _bounded(response: httpx.Response) -> bytes:
    announced = response.headers.get("content-length", "")
    if announced.isdigit() and int(announced) > MAX_ANSWER:
        raise BooksError(
            Kind.PEER_FAILURE, f"the peer's answer is too large (over {MAX_ANSWER} bytes)"
        )
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_ANSWER:
            raise BooksError(
                Kind.PEER_FAILURE, f"the peer's answer is too large (over {MAX_ANSWER} bytes)"
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def link_to(
    store: Store, identity: NodeIdentity, client: httpx.AsyncClient, peer: str
) -> Link:
    for record in await store.peers.peers(include_revoked=True):
        if peer in (record.node_id, record.name):
            descriptor = msgspec.json.decode(record.descriptor, type=NodeDescriptor)
            key = unseal(identity, record.key_from_them).decode() if record.key_from_them else None
            return Link(identity, client, record, descriptor.urls[0], key)
    raise BooksError(Kind.NOT_FOUND, f"no peer {peer!r}")


def _answer(response: PeerAnswer, what: str) -> bytes:
    if response.status_code != 200:
        raise BooksError(
            Kind.PEER_FAILURE, f"the peer refused {what} ({response.status_code}): {response.text}"
        )
    return response.content


async def _their_pages(link: Link, provider: str, size: int) -> AsyncIterator[list[Receipt]]:
    """The peer's copy of one of our two chains, a page at a time (up to `size` receipts,
    which a node older than `limit` ignores: it answers pages of its own size). Its pages
    must move forward: one that does not end the chain, so a peer cannot keep us asking."""
    after = 0
    while True:
        page = _decoded(
            _answer(
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
    async for rows in _stored_pages(store, provider, consumer, size):
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
        _answer(await self.link.post("/federation/receipts", body), "receipts")


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
        await store.ledger.add_countersignature(
            receipt.provider, receipt.consumer, receipt.seq, receipt.csig
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
    tally.add_unanswered(await _unanswered(store, peer, counted))
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


async def _unanswered(store: Store, peer: str, receipts: list[Receipt]) -> list[Receipt]:
    """Receipts that bill us for requests whose answer never reached us whole (our usage
    record says the request did not end with a 200): we owe them, and it shows."""
    theirs = [r for r in receipts if r.provider == peer]
    sent = await sent_to(store, peer, theirs)
    return [r for r in theirs if r.id in sent and sent[r.id].status != 200]


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
        page = _decoded(_answer(response, "to show its receipts"), ReceiptPage)
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


async def settle_with(store: Store, link: Link, actor: str | None = None) -> Statement:
    """Close the period with the peer: a statement of both chains since the last one, signed
    by us, countersigned by the peer after it checked the totals against its own books. The
    settlement is audited as `ledger.settle`, naming `actor` (who asked for it)."""
    me, peer = link.identity.node_id, link.peer.node_id
    # A statement the peer countersigned but whose answer we never got (or that a restored
    # backup lost) is where this period starts, not a reason to disagree.
    await recover_statements(store, link)
    period = await open_period(store, me, peer)
    if period.previous is not None and period.empty:
        return period.previous  # nothing since: settling again is the statement we have
    period.check_billed()
    try:
        statement = period.statement()
    except ValueError as exc:
        raise BooksError(
            Kind.CONFLICT, f"our books with this peer are not in order: {exc}"
        ) from exc
    side = "a" if me == period.a else "b"
    ours = sign_statement(statement, link.identity.sign, side)
    previous = msgspec.to_builtins(period.previous) if period.previous is not None else None
    body = msgspec.json.encode(StatementBody(msgspec.to_builtins(ours), previous))
    answer = _answer(await link.post("/federation/settlements", body), "the settlement")
    try:
        both = parse_statement(msgspec.json.decode(bounded(answer), type=StatementBody).statement)
        verify_statement(both, public_key_of(both.a), public_key_of(both.b))
    except (RecordError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BooksError(
            Kind.PEER_FAILURE, f"the peer's countersigned statement is not valid: {exc}"
        ) from exc
    if not same_period(both, statement):
        raise BooksError(Kind.PEER_FAILURE, "the peer signed a different statement")
    # The peer may answer with the statement it signed for this period before (its `iat`).
    await save_statement(store, both)
    await audit.record(
        store,
        actor,
        "ledger.settle",
        peer,
        from_seq=both.from_seq,
        to_seq=both.to_seq,
        a_owes_b=both.a_owes_b,
        b_owes_a=both.b_owes_a,
    )
    return both


def same_period(one: Statement, other: Statement) -> bool:
    """Two statements of one period with the same totals, whenever (`iat`) and by whom they
    were signed: settling a period again is answered with the statement already signed."""
    unsigned = {"iat": 0, "sig_a": "", "sig_b": ""}
    return msgspec.structs.replace(one, **unsigned) == msgspec.structs.replace(other, **unsigned)


def _ours(body: object, me: str, peer: str) -> Statement | None:
    """A statement between us carrying both signatures (ours among them), or None."""
    try:
        statement = parse_statement(body)  # type: ignore[arg-type]
        if {statement.a, statement.b} != {me, peer}:
            return None
        verify_statement(statement, public_key_of(statement.a), public_key_of(statement.b))
    except (RecordError, ValueError, TypeError):
        return None
    return statement


async def recover_statements(store: Store, link: Link) -> int:
    """Keep the statements of our pair that the peer holds and we do not (newer than our
    last): each bears our own signature, so it is ours whatever the peer is. How many."""
    me, peer = link.identity.node_id, link.peer.node_id
    last = await last_statement(store, me, peer)
    # From a little before our last: the two nodes' clocks (each proposer's `iat`) may differ.
    after = last.iat - 2 * MAX_SKEW if last is not None else -1
    kept = 0
    while True:
        response = await link.get(f"/federation/settlements?after_iat={after}")
        if response.status_code in REFUSALS:
            return kept  # a node older than statement recovery
        page = _decoded(_answer(response, "statements"), StatementPage)
        for body in page.statements:
            statement = _ours(body, me, peer)
            if statement is not None:
                kept += await save_statement(store, statement)
        if not page.more or not page.statements:
            return kept
        newest = max((s.get("iat") for s in page.statements), key=_as_int)
        if _as_int(newest) <= after:
            return kept  # a page that does not advance: stop rather than loop
        after = _as_int(newest)


def _as_int(value: object) -> int:
    return value if type(value) is int else -1


def _decoded(data: bytes, kind: type[T]) -> T:
    try:
        return msgspec.json.decode(bounded(data), type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BooksError(Kind.PEER_FAILURE, f"the peer's answer is not valid: {exc}") from exc


async def save_statement(store: Store, statement: Statement) -> bool:
    """Keep a both-signed statement; False if we held it already."""
    body = msgspec.json.encode(msgspec.to_builtins(statement)).decode()
    return await store.ledger.add_settlement(
        statement.a, statement.b, statement.to_seq, statement.iat, body
    )


async def net(store: Store, me: str, extra: Iterable[bytes | str]) -> NetPlan:
    """A transfer plan clearing every balance in our statements and in `extra` (statements of
    other pairs of the group, as JSON): at most n - 1 transfers.

    Only statements between parties we know count: two signatures prove only that two key
    pairs agreed, and anyone can make key pairs. A statement naming a node that is neither us
    nor a peer of ours (a sybil) is refused: its made-up debt would move real peers' money
    (the plan could have a real debtor pay a sybil, and the sybil "pay" the real creditor)."""
    known = await _parties(store, me)
    statements: dict[tuple[str, str, int], Statement] = {}
    for body in [*(await store.ledger.settlements()), *extra]:
        try:
            statement = parse_statement(body)
            verify_statement(statement, public_key_of(statement.a), public_key_of(statement.b))
        except (RecordError, ValueError) as exc:
            raise BooksError(Kind.INVALID_REQUEST, f"a statement is not valid: {exc}") from exc
        strangers = [node for node in (statement.a, statement.b) if node not in known]
        if strangers:
            raise BooksError(
                Kind.INVALID_REQUEST,
                f"a statement names {', '.join(strangers)}, not a peer of this node: statements"
                " between nodes we do not know are refused (netting only counts real peers)",
            )
        statements[(statement.a, statement.b, statement.iat)] = statement
    owed = balances(statements.values())
    return NetPlan(owed, transfer_plan(owed))


async def _parties(store: Store, me: str) -> set[str]:
    """Us and every node we peered with (an invite or an approved join), revoked or
    suspended ones included: their settled periods are still owed."""
    peers = await store.peers.peers(include_revoked=True)
    return {me, *(p.node_id for p in peers if p.status in ("active", "revoked", "suspended"))}


# --- the other side: answering a peer about our books -------------------------------------------


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


async def countersign_statement(
    store: Store, identity: NodeIdentity, peer: str, body: bytes
) -> Statement:
    """A peer proposes to close the period: sign it only if our own books give the very same
    statement, and keep it. A period we signed already is answered with that statement
    (a lost answer is asked again), and the proposer's previous statement, ours too, is kept
    first if we lost it."""
    me = identity.node_id
    try:
        request = msgspec.json.decode(body, type=StatementBody)
        proposed = parse_statement(request.statement)
    except (RecordError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BooksError(Kind.INVALID_REQUEST, f"not a settlement statement: {exc}") from exc
    if {proposed.a, proposed.b} != {me, peer}:
        raise BooksError(Kind.REFUSED, "a statement between us only")
    their_side = "a" if peer == proposed.a else "b"
    try:
        verify_statement_side(proposed, their_side)
    except RecordError as exc:
        raise BooksError(Kind.CONFLICT, f"our books disagree: {exc}") from exc
    a, b = min(me, peer), max(me, peer)
    for body in await store.ledger.settlements(a, b):
        held = _ours(body, me, peer)
        if held is not None and same_period(held, proposed):
            return held
    previous = _ours(request.previous, me, peer) if request.previous is not None else None
    if previous is not None:
        await save_statement(store, previous)
    period = await open_period(store, me, peer)
    period.check_billed()
    try:
        same_statement(proposed, period.statement(now=proposed.iat))
    except ValueError as exc:
        raise BooksError(
            Kind.CONFLICT, f"our books disagree: cannot check the statement: {exc}"
        ) from exc
    except RecordError as exc:
        raise BooksError(Kind.CONFLICT, f"our books disagree: {exc}") from exc
    both = sign_statement(proposed, identity.sign, "b" if their_side == "a" else "a")
    await save_statement(store, both)
    return both


def verify_statement_side(statement: Statement, side: str) -> None:
    """The proposer's own signature on its side of a statement."""
    fields = msgspec.to_builtins(statement)
    node = statement.a if side == "a" else statement.b
    verify_fields(fields, public_key_of(node), f"sig_{side}")


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
