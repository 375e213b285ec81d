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
from node import books
from node.receipts import keep_receipts, stored
from node.storage import Store, UsageRecord


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


def take(r: Receipt, sender: str = PROVIDER.id, sent: SentRequest | None = SENT) -> Receipt:
    return take_receipt(receipt_fields(r), me=CONSUMER.id, sender=sender, sent=sent)


counts = st.integers(min_value=0, max_value=10**7)


@settings(max_examples=60, deadline=None)
@given(tokens_in=counts, tokens_out=counts, seq_back=st.integers(0, 5), discount=st.integers(0, 9))
def test_the_provider_s_receipt_for_our_request_as_priced_is_taken(
    tokens_in: int, tokens_out: int, seq_back: int, discount: int
) -> None:
    """Priced under the advert the request was routed under (or an earlier one), at most
    what its tokens cost at those prices: taken, exactly as signed."""
    fair = price_of(tokens_in, tokens_out, SENT.price_in, SENT.price_out)
    r = receipt(
        tokens=(tokens_in, tokens_out),
        price_seq=SENT.price_seq - seq_back,
        amount=fair * (10 - discount) // 10,
    )
    assert take(r) == r


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
@given(kind=MISFITS, bump=st.integers(1, 10**6))
def test_anything_else_is_refused(kind: str, bump: int) -> None:
    r, sender, sent = misfit(kind, bump)
    with pytest.raises(RecordError):
        take(r, sender, sent)


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
        async with Store.opened(tmp_path / "db") as store:
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
            assert [r.seq for r in await store.receipts(PROVIDER.id, CONSUMER.id)] == [1, 3]
            # The real seq 2 fills the gap.
            assert len((await keep_receipts(store, [two])).kept) == 1
            assert [r.seq for r in await store.receipts(PROVIDER.id, CONSUMER.id)] == [1, 2, 3]
            assert all(check.ok for check in await books.verify(store))

    asyncio.run(run())


def usage(request_id: str, status: int, sent: SentRequest = SENT) -> UsageRecord:
    return UsageRecord(
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
        peer_id=sent.peer,
        peer_model=sent.model,
        price_seq=sent.price_seq,
        price_in=sent.price_in,
        price_out=sent.price_out,
    )


def test_what_we_are_billed_for_answers_that_never_reached_us_shows(tmp_path: Path) -> None:
    """Our usage record of each request is what its receipt is checked against, and says
    how it ended: a receipt for one whose answer did not reach us whole is counted (the
    provider produced it) and shown as unanswered."""

    async def run() -> None:
        async with Store.opened(tmp_path / "db") as store:
            await store.insert_usage([usage("req_1", 200), usage("req_2", 499)])
            sent = await store.sent_requests(PROVIDER.id, ["req_1", "req_2", "req_3"])
            assert sent["req_1"] == SENT and sent["req_2"].status == 499 and "req_3" not in sent
            one, two = chain(2)
            await keep_receipts(store, [one, two])
            (row,) = await books.balance(store, CONSUMER.id)
            assert row.we_used == one.amount + two.amount
            assert row.unanswered == two.amount

    asyncio.run(run())


def test_an_in_band_receipt_for_another_request_is_not_kept(tmp_path: Path) -> None:
    """The receipt a peer returns with its answer must be for that very request, as asked."""
    from node.receipts import Ledger, _Taken

    class Identity:
        node_id = CONSUMER.id

        def sign(self, data: bytes) -> bytes:
            return CONSUMER.sign(data)

    ledger = Ledger(Identity(), None, None, None)  # type: ignore[arg-type]
    good = receipt()
    data = msgspec.json.encode(receipt_fields(good))
    assert ledger._checked(_Taken(SENT, data, good.amount)) is not None
    for wrong in (
        receipt(id="req_other"),
        receipt(model="other"),
        receipt(price_seq=SENT.price_seq + 1),
    ):
        data = msgspec.json.encode(receipt_fields(wrong))
        assert ledger._checked(_Taken(SENT, data, good.amount)) is None


def test_stored_rows_round_trip() -> None:
    r = chain(1)[0]
    assert stored(r).hash == receipt_hash(r)
