"""The node's books with its peers: balances, verification, reconciliation, settlement,
netting and export. Shared by `aihub ledger …` (on the data folder) and the admin API (in the
running node); both talk to peers with signed requests.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import httpx
import msgspec

from federation.descriptors import NodeDescriptor, public_key_of
from federation.identity import NodeIdentity
from federation.sealing import unseal
from ledger.chain import verify_chain
from ledger.netting import Transfer, transfer_plan
from ledger.receipts import (
    GENESIS,
    Receipt,
    check_billing,
    countersign,
    receipt_fields,
    verify_receipt,
)
from ledger.reconcile import reconcile
from ledger.records import MAX_SKEW, RecordError, verify_fields
from ledger.settlement import (
    Settlement,
    balances,
    check_statement,
    make_statement,
    parse_statement,
    sign_statement,
    verify_statement,
)
from node.errors import ApiError
from node.peering import signed_request
from node.receipts import (
    admissible,
    held_advert_seq,
    loaded,
    record_equivocation,
    sent_to,
    stored,
)
from node.storage import PeerRecord, Store, StoredReceipt, body_hash

log = logging.getLogger("aihub.ledger")

PAGE = 1000  # receipts per page when two nodes compare their books
KeepReceipt = Callable[[Receipt], Awaitable[bool]]


class BooksError(ApiError):
    """What stops a ledger operation, said plainly; an OpenAI-shaped error where it reaches
    the HTTP API (admin or federation), a plain message in the CLI."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message, code="ledger_error")

    @property
    def message(self) -> str:
        return self.detail.message


# --- wire types between nodes ---------------------------------------------------------------


class ReceiptPage(msgspec.Struct):
    receipts: list[dict[str, object]]
    more: bool


class ReceiptBatch(msgspec.Struct):
    receipts: list[dict[str, object]]


class StatementBody(msgspec.Struct):
    statement: dict[str, object]


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


class NetPlan(msgspec.Struct):
    balances: dict[str, int]
    transfers: list[Transfer]


# --- a pair's chains --------------------------------------------------------------------------


@dataclass
class Pair:
    """Our books with one peer: the two chains, from after the last settlement."""

    me: str
    peer: str
    previous: Settlement | None
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


async def last_statement(store: Store, me: str, peer: str) -> Settlement | None:
    """The pair's statement that covers the most of its chains (not the newest by `iat`:
    the two nodes' clocks differ, and a statement out of order must not reopen a period)."""
    return (await _coverage(store, me, peer))[0]


async def _coverage(
    store: Store, me: str, peer: str
) -> tuple[Settlement | None, dict[tuple[str, str], list[StoredReceipt]], dict[str, int]]:
    """The last statement, both chains as stored (by (provider, consumer)), and the highest
    seq of each chain the statements cover, by provider."""
    a, b = min(me, peer), max(me, peer)
    chains = {(a, b): await store.receipts(a, b), (b, a): await store.receipts(b, a)}
    best: tuple[tuple[int, int, int], Settlement] | None = None
    for body in await store.settlements(a, b):
        statement = parse_statement(body)
        covered = (statement.to_seq, _settled_seq(chains[(b, a)], statement), statement.iat)
        if best is None or covered > best[0]:
            best = (covered, statement)
    if best is None:
        return None, chains, {a: 0, b: 0}
    (ab_seq, ba_seq, _), statement = best
    return statement, chains, {a: ab_seq, b: ba_seq}


def _settled_seq(b_to_a: list[StoredReceipt], statement: Settlement) -> int:
    """The seq of the b→a receipt a statement's head names (the format gives that chain's
    range by hash only). The hash is recomputed from each body; if no receipt we hold has
    it (a damaged or moved head, which `verify` names), the receipts issued before the
    statement, allowing for clock skew, count as covered: a period is never counted twice."""
    if statement.head_b_to_a == GENESIS:
        return 0
    for row in b_to_a:
        if body_hash(row.body) == statement.head_b_to_a:
            return row.seq
    issued = [row.seq for row in b_to_a if row.iat <= statement.iat + MAX_SKEW]
    return max(issued, default=0)


async def open_pair(store: Store, me: str, peer: str) -> Pair:
    previous, chains, settled = await _coverage(store, me, peer)

    def after(provider: str, consumer: str) -> list[Receipt]:
        rows = chains[(provider, consumer)]
        return [loaded(row) for row in rows if row.seq > settled[provider]]

    return Pair(me, peer, previous, after(me, peer), after(peer, me))


async def _peer_ids(store: Store, me: str) -> dict[str, str]:
    """Every node we keep books with, by id, with its name."""
    names = {p.node_id: p.name for p in await store.peers(include_revoked=True)}
    for provider, consumer in await store.receipt_pairs():
        other = consumer if provider == me else provider
        names.setdefault(other, other[:20] + "…")
    return names


# --- balance, verify, export ------------------------------------------------------------------


async def balance(store: Store, me: str) -> list[PairBalance]:
    result = []
    for peer, name in (await _peer_ids(store, me)).items():
        pair = await open_pair(store, me, peer)
        we_used = sum(r.amount for r in pair.theirs)
        they_used = sum(r.amount for r in pair.ours)
        count = len(pair.ours) + len(pair.theirs)
        unanswered = sum(r.amount for r in await _unanswered(store, peer, pair.theirs))
        result.append(
            PairBalance(peer, name, we_used, they_used, they_used - we_used, count, unanswered)
        )
    return result


async def verify(store: Store) -> list[ChainCheck]:
    """Every signature and every link of every chain we hold, the first broken link of each;
    then every settlement statement: both signatures, and its heads and totals against the
    receipts of its period in our chains."""
    checks = []
    for provider, consumer in sorted(await store.receipt_pairs()):
        rows = await store.receipts(provider, consumer)
        try:
            receipts = [loaded(row) for row in rows]
        except RecordError as exc:
            checks.append(ChainCheck(provider, consumer, len(rows), False, f"unreadable: {exc}"))
            continue
        report = verify_chain(receipts, public_key_of(provider), public_key_of(consumer))
        problem = None if report.ok else str(report)
        if report.ok:
            problem = _hash_column_problem(rows)
        checks.append(ChainCheck(provider, consumer, len(rows), problem is None, problem))
    pairs = {tuple(sorted(pair)) for pair in await store.receipt_pairs()}
    for body in await store.settlements():
        try:
            statement = parse_statement(body)
        except RecordError:
            continue  # named below, under its pair, if it is one of ours
        pairs.add((statement.a, statement.b))
    for a, b in sorted(pairs):
        checks += await _verify_statements(store, a, b)
    return checks


def _hash_column_problem(rows: list[StoredReceipt]) -> str | None:
    """The `hash` column is derived from the body: name a row where it is not (the chain
    itself is checked from the bodies, and links are always recomputed from them)."""
    for row in rows:
        if row.hash != body_hash(row.body):
            return f"seq {row.seq}: the stored hash column is not the hash of its receipt"
    return None


async def _verify_statements(store: Store, a: str, b: str) -> list[ChainCheck]:
    """Each statement of the pair (a, b), in the order they cover the chains: both
    signatures, and exactly the totals and heads our receipts of its period give."""
    ab = [loaded(row) for row in await store.receipts(a, b)]
    ba_rows = await store.receipts(b, a)
    ba = [loaded(row) for row in ba_rows]
    checks, valid = [], []
    for body in await store.settlements(a, b):
        try:
            statement = parse_statement(body)
            verify_statement(statement, public_key_of(a), public_key_of(b))
        except RecordError as exc:
            checks.append(ChainCheck(a, b, 0, False, f"a statement: {exc}", kind="statement"))
            continue
        valid.append((statement.to_seq, _settled_seq(ba_rows, statement), statement.iat, statement))
    previous: Settlement | None = None
    ab_from = ba_from = 0
    for ab_to, ba_to, _, statement in sorted(valid, key=lambda item: item[:3]):
        ab_period = [r for r in ab if ab_from < r.seq <= ab_to]
        ba_period = [r for r in ba if ba_from < r.seq <= ba_to]
        try:
            check_statement(statement, ab_period, ba_period, previous=previous)
            problem = None
        except RecordError as exc:
            problem = f"statement of seq {statement.from_seq}..{statement.to_seq}: {exc}"
        count = len(ab_period) + len(ba_period)
        checks.append(ChainCheck(a, b, count, problem is None, problem, kind="statement"))
        previous, ab_from, ba_from = statement, ab_to, ba_to
    return checks


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
    rows = await store.receipts_since(since)
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

    async def get(self, path: str) -> httpx.Response:
        return await signed_request(self.client, self.identity, "GET", self.url + path, self.key)

    async def post(self, path: str, body: bytes) -> httpx.Response:
        return await signed_request(
            self.client, self.identity, "POST", self.url + path, self.key, body
        )


async def link_to(
    store: Store, identity: NodeIdentity, client: httpx.AsyncClient, peer: str
) -> Link:
    for record in await store.peers(include_revoked=True):
        if peer in (record.node_id, record.name):
            descriptor = msgspec.json.decode(record.descriptor, type=NodeDescriptor)
            key = unseal(identity, record.key_from_them).decode() if record.key_from_them else None
            return Link(identity, client, record, descriptor.urls[0], key)
    raise BooksError(404, f"no peer {peer!r}")


def _answer(response: httpx.Response, what: str) -> bytes:
    if response.status_code != 200:
        raise BooksError(
            502, f"the peer refused {what} ({response.status_code}): {response.text[:300]}"
        )
    return response.content


async def _their_chain(link: Link, provider: str) -> list[Receipt]:
    """The peer's copy of one of our two chains, page by page."""
    receipts: list[Receipt] = []
    after = 0
    while True:
        page = msgspec.json.decode(
            _answer(
                await link.get(f"/federation/receipts?provider={provider}&after_seq={after}"),
                "to show its receipts",
            ),
            type=ReceiptPage,
        )
        for fields in page.receipts:
            try:
                receipts.append(msgspec.convert(fields, Receipt))
            except msgspec.ValidationError:
                continue  # reconcile would refuse it anyway; a bad one must not stop the rest
        if not page.more or not page.receipts:
            return receipts
        after = receipts[-1].seq if receipts else after + len(page.receipts)


async def reconcile_with(store: Store, link: Link, keep: KeepReceipt) -> ReconcileReport:
    """Compare both chains with the peer's copies; recover what we miss (from their signed
    copies), send what they miss, and report every difference."""
    me, peer = link.identity.node_id, link.peer.node_id
    ours = [loaded(r) for r in await store.receipts(me, peer)]
    ours += [loaded(r) for r in await store.receipts(peer, me)]
    theirs = await _their_chain(link, me) + await _their_chain(link, peer)
    result = reconcile(ours, theirs, between=(me, peer))
    recovered, refused = await _recoverable(store, link, result.missing_ours)
    for receipt in recovered:
        if not await keep(receipt):
            refused.append(receipt)
    for receipt in result.csig_for_ours:
        await store.add_countersignature(
            receipt.provider, receipt.consumer, receipt.seq, receipt.csig
        )
    signed = await _countersign_disputed(store, link, result.disputed)
    for equivocation in result.equivocation:
        await record_equivocation(store, stored(equivocation.first), stored(equivocation.second))
    # Our countersignatures of what we recovered or signed now go back with the rest.
    countersigned = [r for r in recovered if r.consumer == me and r not in refused]
    send = [*result.missing_theirs, *result.csig_for_theirs, *signed, *countersigned]
    for start in range(0, len(send), PAGE):
        batch = ReceiptBatch([receipt_fields(r) for r in send[start : start + PAGE]])
        _answer(await link.post("/federation/receipts", msgspec.json.encode(batch)), "receipts")
    buckets = {name: Bucket(*totals) for name, totals in result.totals().items()}
    taken = [r for r in recovered if r not in refused]
    buckets["missing_ours"] = _bucket(taken)
    buckets["rejected"] = _bucket([*(x.receipt for x in result.rejected), *refused])
    counted = [*taken, *(r for r in result.matched if r.consumer == me), *signed]
    suspended = any(e.provider == peer for e in result.equivocation)
    return ReconcileReport(
        peer=peer,
        suspended=suspended,
        unanswered=_bucket(await _unanswered(store, peer, counted)),
        **buckets,
    )


def _bucket(receipts: list[Receipt]) -> Bucket:
    return Bucket(len(receipts), sum(r.amount for r in receipts))


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
        await store.add_countersignature(receipt.provider, me, receipt.seq, receipt.csig)
    return signed


async def _unanswered(store: Store, peer: str, receipts: list[Receipt]) -> list[Receipt]:
    """Receipts that bill us for requests whose answer never reached us whole (our usage
    record says the request did not end with a 200): we owe them, and it shows."""
    theirs = [r for r in receipts if r.provider == peer]
    sent = await sent_to(store, peer, theirs)
    return [r for r in theirs if r.id in sent and sent[r.id].status != 200]


async def settle_with(store: Store, link: Link) -> Settlement:
    """Close the period with the peer: a statement of both chains since the last one, signed
    by us, countersigned by the peer after it checked the totals against its own books."""
    me, peer = link.identity.node_id, link.peer.node_id
    pair = await open_pair(store, me, peer)
    await _check_billed(store, pair)
    try:
        statement = make_statement(
            pair.a_to_b(), pair.b_to_a(), pair.a, pair.b, previous=pair.previous
        )
    except ValueError as exc:
        raise BooksError(409, f"our books with this peer are not in order: {exc}") from exc
    side = "a" if me == pair.a else "b"
    ours = sign_statement(statement, link.identity.sign, side)
    body = msgspec.json.encode(StatementBody(msgspec.to_builtins(ours)))
    answer = _answer(await link.post("/federation/settlements", body), "the settlement")
    try:
        both = parse_statement(msgspec.json.decode(answer, type=StatementBody).statement)
        verify_statement(both, public_key_of(both.a), public_key_of(both.b))
    except (RecordError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BooksError(502, f"the peer's countersigned statement is not valid: {exc}") from exc
    if msgspec.structs.replace(both, sig_a="", sig_b="") != statement:
        raise BooksError(502, "the peer signed a different statement")
    await save_statement(store, both)
    return both


async def save_statement(store: Store, statement: Settlement) -> None:
    body = msgspec.json.encode(msgspec.to_builtins(statement)).decode()
    await store.add_settlement(statement.a, statement.b, statement.to_seq, statement.iat, body)


async def net(store: Store, extra: Iterable[bytes | str]) -> NetPlan:
    """A transfer plan clearing every balance in our statements and in `extra` (statements of
    other pairs of the group, as JSON): at most n - 1 transfers."""
    statements: dict[tuple[str, str, int], Settlement] = {}
    for body in [*(await store.settlements()), *extra]:
        try:
            statement = parse_statement(body)
            verify_statement(statement, public_key_of(statement.a), public_key_of(statement.b))
        except (RecordError, ValueError) as exc:
            raise BooksError(400, f"a statement is not valid: {exc}") from exc
        statements[(statement.a, statement.b, statement.iat)] = statement
    owed = balances(statements.values())
    return NetPlan(owed, transfer_plan(owed))


# --- the other side: answering a peer about our books -------------------------------------------


async def receipts_page(store: Store, me: str, peer: str, provider: str, after_seq: int) -> bytes:
    """A page of one of the two chains between us and `peer`, with countersignatures."""
    if provider not in (me, peer):
        raise BooksError(403, "only the chains between us are shown")
    consumer = peer if provider == me else me
    rows = await store.receipts(provider, consumer, after_seq=after_seq, limit=PAGE + 1)
    page = ReceiptPage([receipt_fields(loaded(row)) for row in rows[:PAGE]], len(rows) > PAGE)
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
        raise BooksError(400, f"not a batch of receipts: {exc}") from exc
    if len(batch.receipts) > PAGE:
        raise BooksError(413, f"at most {PAGE} receipts at once")
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


async def countersign_statement(
    store: Store, identity: NodeIdentity, peer: str, body: bytes
) -> Settlement:
    """A peer proposes to close the period: sign it only if our own books give the very same
    statement, and keep it."""
    me = identity.node_id
    try:
        proposed = parse_statement(msgspec.json.decode(body, type=StatementBody).statement)
    except (RecordError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BooksError(400, f"not a settlement statement: {exc}") from exc
    if {proposed.a, proposed.b} != {me, peer}:
        raise BooksError(403, "a statement between us only")
    their_side = "a" if peer == proposed.a else "b"
    try:
        verify_statement_side(proposed, their_side)
        pair = await open_pair(store, me, peer)
        await _check_billed(store, pair)
        check_statement(proposed, pair.a_to_b(), pair.b_to_a(), previous=pair.previous)
    except RecordError as exc:
        raise BooksError(409, f"our books disagree: {exc}") from exc
    both = sign_statement(proposed, identity.sign, "b" if their_side == "a" else "a")
    await save_statement(store, both)
    return both


async def _check_billed(store: Store, pair: Pair) -> None:
    """A statement is signed only over amounts we can match, receipt by receipt, to requests
    we sent the peer, as we asked and priced them (receipts in our books from before that
    rule was kept, or put there by hand, stop the settlement: they are for an admin)."""
    sent = await sent_to(store, pair.peer, pair.theirs)
    seq = await held_advert_seq(store, pair.peer)
    refused = []
    for receipt in pair.theirs:
        try:
            check_billing(
                receipt, me=pair.me, sender=pair.peer, sent=sent.get(receipt.id), advert_seq=seq
            )
        except RecordError as exc:
            refused.append((receipt, str(exc)))
    if refused:
        receipt, why = refused[0]
        raise BooksError(
            409,
            f"our books hold {len(refused)} receipt(s) of this peer that bill no request of"
            f" ours as sent (seq {receipt.seq}: {why})",
        )


def verify_statement_side(statement: Settlement, side: str) -> None:
    """The proposer's own signature on its side of a statement."""
    fields = msgspec.to_builtins(statement)
    node = statement.a if side == "a" else statement.b
    verify_fields(fields, public_key_of(node), f"sig_{side}")


async def reconcile_all(
    store: Store, identity: NodeIdentity, client: httpx.AsyncClient, keep: KeepReceipt
) -> list[ReconcileReport]:
    """Reconcile with every active peer we hold a key from (on a schedule); a peer that does
    not answer is tried again next time."""
    reports = []
    for record in await store.peers():
        if record.status != "active" or not record.key_from_them:
            continue
        try:
            link = await link_to(store, identity, client, record.node_id)
            reports.append(await reconcile_with(store, link, keep))
        except (BooksError, httpx.HTTPError, RecordError) as exc:
            log.info("reconciliation with %s failed: %s", record.name, exc)
    return reports
