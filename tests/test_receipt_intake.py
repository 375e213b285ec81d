"""Which receipts a node takes (DESIGN.md, "Who may hand a node a receipt"): only as the
consumer, from the provider that signed it, for a request it sent that provider, as it asked
and priced it; only where it links with the chain held; and what it is billed for answers that
never reached it shows. Property tests of the rule, and the store's and ledger's use of it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from ledger.receipts import (
    GENESIS,
    Receipt,
    SentRequest,
    make_receipt,
    node_id_of,
    price_of,
    receipt_fields,
    receipt_hash,
    take_receipt,
)
from ledger.records import RecordError, Signer
from node.ingress.errors import openai_status
from node.peers.books.balance import balance as books_balance
from node.peers.books.errors import BooksError
from node.peers.books.settlement import countersign_statement
from node.peers.books.verify import verify as books_verify
from node.peers.receipts import keep_receipts, stored
from node.storage import opened
from node.storage.records import Charge, UsageRecord


class Node:
    def __init__(self, seed: int) -> None:
        self.key = SigningKey(bytes([seed]) * 32)
        self.id = node_id_of(bytes(self.key.verify_key))

    @property
    def sign(self) -> Signer:
        return lambda data: self.key.sign(data).signature


PROVIDER, CONSUMER, OTHER = Node(1), Node(2), Node(3)
SENT = SentRequest(
    id="req_1", peer=PROVIDER.id, model="llama3", price_seq=5, price_in=1_000_000, price_out=2_000
)


def receipt(
    signer: Node = PROVIDER,
    *,
    seq: int = 1,
    prev: str = GENESIS,
    tokens: tuple[int, int] = (10, 20),
    **fields: object,
) -> Receipt:
    terms: dict = {
        "id": SENT.id,
        "provider": PROVIDER.id,
        "consumer": CONSUMER.id,
        "key_id": "k",
        "model": SENT.model,
        "tokens_in": tokens[0],
        "tokens_out": tokens[1],
        "amount": price_of(*tokens, SENT.price_in, SENT.price_out),
        "price_seq": SENT.price_seq,
        "seq": seq,
        "prev": prev,
    }
    terms.update(fields)
    return make_receipt(signer.sign, **terms)


def take(
    r: Receipt, sender: str = PROVIDER.id, sent: SentRequest | None = SENT, held: int = 0
) -> Receipt:
    return take_receipt(
        receipt_fields(r), me=CONSUMER.id, sender=sender, sent=sent, advert_seq=held
    )


counts = st.integers(min_value=0, max_value=10**7)


@settings(max_examples=60, deadline=None)
@given(
    tokens_in=counts,
    tokens_out=counts,
    seq_shift=st.integers(-5, 5),
    held=st.integers(0, 10),
    discount=st.integers(0, 9),
)
def test_the_provider_s_receipt_for_our_request_as_priced_is_taken(
    tokens_in: int, tokens_out: int, seq_shift: int, held: int, discount: int
) -> None:
    """Priced under an advert seq we hold (at most the newest we hold, or the one the
    request was routed under), at most what its tokens cost at the routed prices: taken,
    exactly as signed."""
    fair = price_of(tokens_in, tokens_out, SENT.price_in, SENT.price_out)
    price_seq = max(0, SENT.price_seq + seq_shift)
    r = receipt(
        tokens=(tokens_in, tokens_out), price_seq=price_seq, amount=fair * (10 - discount) // 10
    )
    if price_seq > max(SENT.price_seq, held):
        with pytest.raises(RecordError):
            take(r, held=held)
    else:
        assert take(r, held=held) == r


# One way each that a receipt is not ours to take: (what changes, and how).
MISFITS = st.sampled_from(
    [
        "sender",  # handed to us by another node than its provider
        "forged provider",  # names the provider, signed by another key
        "self provider",  # the sender names itself provider of a request it never served
        "consumer",  # for another consumer
        "unknown request",  # for a request we never sent
        "other peer's request",  # for a request we sent another node
        "model",
        "price seq",
        "amount",
    ]
)


def misfit(kind: str, bump: int) -> tuple[Receipt, str, SentRequest | None]:
    """A receipt, the node handing it to us, and our record of its request."""
    if kind == "sender":
        return receipt(), OTHER.id, SENT
    if kind == "forged provider":
        return receipt(OTHER), PROVIDER.id, SENT
    if kind == "self provider":
        return receipt(OTHER, provider=OTHER.id), OTHER.id, None
    if kind == "consumer":
        return receipt(consumer=OTHER.id), PROVIDER.id, SENT
    if kind == "unknown request":
        return receipt(id=f"req_never_{bump}"), PROVIDER.id, None
    if kind == "other peer's request":
        return receipt(), PROVIDER.id, msgspec.structs.replace(SENT, peer=OTHER.id)
    if kind == "model":
        return receipt(model=f"gpt-{bump}"), PROVIDER.id, SENT
    if kind == "price seq":
        return receipt(price_seq=SENT.price_seq + bump), PROVIDER.id, SENT
    fair = price_of(10, 20, SENT.price_in, SENT.price_out)
    return receipt(amount=fair + bump), PROVIDER.id, SENT


@settings(max_examples=120, deadline=None)
@given(kind=MISFITS, bump=st.integers(1, 10**6), held=st.integers(0, 10))
def test_anything_else_is_refused(kind: str, bump: int, held: int) -> None:
    """Whatever newer advert we hold (`held` above the routed seq, or none)."""
    r, sender, sent = misfit(kind, bump)
    held = SENT.price_seq + held if kind != "price seq" else min(held, SENT.price_seq)
    with pytest.raises(RecordError):
        take(r, sender, sent, held)


# --- the store: links and one receipt per request -------------------------------------------


def chain(n: int, start: int = 1, prev: str = GENESIS) -> list[Receipt]:
    receipts = []
    for seq in range(start, start + n):
        r = receipt(seq=seq, prev=prev, id=f"req_{seq}")
        receipts.append(r)
        prev = receipt_hash(r)
    return receipts


def test_a_receipt_that_does_not_link_with_its_neighbours_is_refused(tmp_path: Path) -> None:
    async def run() -> None:
        async with opened(tmp_path / "db") as store:
            one, two, three = chain(3)
            # Arriving out of order is fine: each links with the neighbours we hold.
            kept = await keep_receipts(store, [three, one])
            assert len(kept.kept) == 2 and not kept.refused
            # A seq 2 whose prev is not the hash of seq 1: refused, and not stored.
            unlinked = receipt(seq=2, prev=receipt_hash(three), id="req_2")
            kept = await keep_receipts(store, [unlinked])
            assert [why for _, why in kept.refused] == ["prev is not the hash of seq 1"]
            # One that seq 3 does not name as its prev: refused too.
            stranger = receipt(seq=2, prev=receipt_hash(one), id="req_2", tokens=(1, 1))
            kept = await keep_receipts(store, [stranger])
            assert [why for _, why in kept.refused] == ["seq 3 does not link to it"]
            # A second receipt for a request that has one: refused.
            twice = receipt(seq=4, prev=receipt_hash(three), id="req_1")
            assert (await keep_receipts(store, [twice])).refused
            # Seq 1 must start the chain.
            other = Node(4)
            late = receipt(other, provider=other.id, seq=1, prev=receipt_hash(one))
            assert (await keep_receipts(store, [late])).refused
            assert [r.seq for r in await store.ledger.receipts(PROVIDER.id, CONSUMER.id)] == [1, 3]
            # The real seq 2 fills the gap.
            assert len((await keep_receipts(store, [two])).kept) == 1
            assert [r.seq for r in await store.ledger.receipts(PROVIDER.id, CONSUMER.id)] == [
                1,
                2,
                3,
            ]
            assert all(check.ok for check in await books_verify(store))

    asyncio.run(run())


def settled(request_id: str, status: int, sent: SentRequest = SENT) -> Charge:
    """Our usage record of a request routed to the provider, with what we asked it."""
    record = UsageRecord(
        request_id=request_id,
        ts_ms=1,
        key_id="k",
        tenant_id=None,
        model=sent.model,
        deployment=f"{sent.model}@provider",
        provider="peer",
        endpoint="chat",
        stream=True,
        tokens_in=10,
        tokens_out=20,
        estimated=status != 200,
        cost_micros=1,
        latency_ms=1,
        status=status,
    )
    return Charge(record, [], msgspec.structs.replace(sent, id=request_id, status=status))


def test_what_we_are_billed_for_answers_that_never_reached_us_shows(tmp_path: Path) -> None:
    """Our usage record of each request is what its receipt is checked against, and says
    how it ended: a receipt for one whose answer did not reach us whole is counted (the
    provider produced it) and shown as unanswered."""

    async def run() -> None:
        async with opened(tmp_path / "db") as store:
            await store.usage.write_batch([settled("req_1", 200), settled("req_2", 499)], [])
            sent = await store.ledger.sent_requests(PROVIDER.id, ["req_1", "req_2", "req_3"])
            assert sent["req_1"] == SENT and sent["req_2"].status == 499 and "req_3" not in sent
            one, two = chain(2)
            await keep_receipts(store, [one, two])
            (row,) = await books_balance(store, CONSUMER.id)
            assert row.we_used == one.amount + two.amount
            assert row.unanswered == two.amount

    asyncio.run(run())


def test_an_in_band_receipt_for_another_request_is_not_kept(tmp_path: Path) -> None:
    """The receipt a peer returns with its answer must be for that very request, as asked."""
    from node.peers.receipts import Receipts, _Taken

    class Identity:
        node_id = CONSUMER.id

        def sign(self, data: bytes) -> bytes:
            return CONSUMER.sign(data)

    class Peering:
        peers: dict = {}

    ledger = Receipts(Identity(), None, None, Peering())  # type: ignore[arg-type]
    good = receipt()
    data = msgspec.json.encode(receipt_fields(good))
    assert ledger._checked(_Taken(SENT, data, good.amount)).csig
    for wrong in (
        receipt(id="req_other"),
        receipt(model="other"),
        receipt(price_seq=SENT.price_seq + 1),
    ):
        data = msgspec.json.encode(receipt_fields(wrong))
        with pytest.raises(RecordError):
            ledger._checked(_Taken(SENT, data, good.amount))


def test_stored_rows_round_trip() -> None:
    r = chain(1)[0]
    assert stored(r).hash == receipt_hash(r)


def test_receipts_taken_before_the_rule_keep_a_record_of_their_request(tmp_path: Path) -> None:
    """Upgrading: the migration fills in the routed-request record of each receipt already
    held from the peer its usage record names, and of no other."""
    import sqlite3

    from node.storage.migrations import MIGRATIONS

    db = sqlite3.connect(tmp_path / "db", isolation_level=None)
    for number, migration in enumerate(MIGRATIONS[:4], start=1):
        db.executescript(f"BEGIN; {migration.sqlite}; PRAGMA user_version = {number}; COMMIT;")
    db.execute(
        "INSERT INTO peers (node_id, name, descriptor, status, created_at) VALUES (?,?,?,?,?)",
        (PROVIDER.id, "alice", "{}", "active", 1),
    )
    old_usage = (
        "INSERT INTO usage VALUES (?,1,'k',NULL,'llama3',?,'peer','chat',0,10,20,0,1,1,200,NULL)"
    )
    db.execute(old_usage, ("req_1", "llama3@alice"))
    db.execute(old_usage, ("req_2", "llama3@bob"))  # routed to another peer than the receipt's
    for r in (receipt(), receipt(seq=2, prev=receipt_hash(receipt()), id="req_2")):
        db.execute(
            "INSERT INTO receipts VALUES (?,?,?,?,?,?,?,?,?,?)", msgspec.structs.astuple(stored(r))
        )
    db.close()

    async def run() -> None:
        async with opened(tmp_path / "db") as store:
            sent = await store.ledger.sent_requests(PROVIDER.id, ["req_1", "req_2"])
            assert list(sent) == ["req_1"]
            assert (sent["req_1"].model, sent["req_1"].price_seq) == ("llama3", SENT.price_seq)
            take(receipt(), sent=sent["req_1"])

    asyncio.run(run())


def test_a_statement_over_receipts_that_bill_no_request_of_ours_is_not_countersigned(
    tmp_path: Path,
) -> None:
    """Receipts that reached our books without the rule (kept before it, or by hand) stop a
    settlement: we sign only totals we can match, receipt by receipt, to requests we sent."""
    from ledger.settlement import make_statement, sign_statement

    class Identity:
        node_id = CONSUMER.id

        def sign(self, data: bytes) -> bytes:
            return CONSUMER.sign(data)

    one, two = chain(2)
    a, b = sorted((PROVIDER, CONSUMER), key=lambda node: node.id)
    a_to_b, b_to_a = ([one, two], []) if PROVIDER is a else ([], [one, two])
    proposed = make_statement(a_to_b, b_to_a, a.id, b.id, previous=None)
    side = "a" if PROVIDER is a else "b"
    body = msgspec.json.encode(
        {"statement": msgspec.to_builtins(sign_statement(proposed, PROVIDER.sign, side))}
    )

    async def run() -> None:
        async with opened(tmp_path / "db") as store:
            for row in (stored(one), stored(two)):  # in our books, bypassing the rule
                await store.db.execute(
                    "INSERT INTO receipts VALUES (?,?,?,?,?,?,?,?,?,?)",
                    msgspec.structs.astuple(row),
                )
            await store.usage.write_batch([settled("req_1", 200)], [])  # we sent req_1 only
            with pytest.raises(BooksError) as refused:
                await countersign_statement(store, Identity(), PROVIDER.id, body)  # type: ignore[arg-type]
            assert openai_status(refused.value) == 409 and "req_2" in refused.value.message
            assert await store.ledger.settlements() == []
            await store.usage.write_batch([settled("req_2", 200)], [])
            both = await countersign_statement(store, Identity(), PROVIDER.id, body)  # type: ignore[arg-type]
            assert both.sig_a and both.sig_b

    asyncio.run(run())


def test_our_own_countersignature_stands_for_a_lost_record_of_the_request() -> None:
    """A consumer restored from a backup lost its record of requests it sent since then; the
    provider still holds those receipts with our countersignature, which only we can make:
    they are taken back. A countersignature by any other key (an attacker's) is not."""
    from ledger.receipts import countersign

    ours = countersign(receipt(), CONSUMER.sign)
    assert take(ours, sent=None) == ours
    forged = countersign(receipt(), OTHER.sign)
    with pytest.raises(RecordError, match="csig"):
        take(forged, sent=None)
    with pytest.raises(RecordError, match="names no request we sent"):
        take(receipt(), sent=None)
