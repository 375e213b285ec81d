"""Statements out of order: the two nodes' clocks differ, so a later period's statement can
carry an earlier `iat`. Balances and the next settlement start from the statement that covers
the most of the chains, never from an older one (which would count a settled period again)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
from nacl.signing import SigningKey

from ledger.receipts import GENESIS, Receipt, make_receipt, node_id_of, receipt_hash
from ledger.settlement import make_statement, sign_statement
from node.peers.books.balance import balance as books_balance
from node.peers.books.period import open_pair
from node.peers.books.verify import verify as books_verify
from node.peers.receipts import keep_receipts
from node.storage import opened


class Node:
    def __init__(self, seed: int) -> None:
        self.key = SigningKey(bytes([seed]) * 32)
        self.id = node_id_of(bytes(self.key.verify_key))

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data).signature


def chain(provider: Node, consumer: Node, n: int) -> list[Receipt]:
    receipts, prev = [], GENESIS
    for seq in range(1, n + 1):
        r = make_receipt(
            provider.sign,
            id=f"req_{seq}",
            provider=provider.id,
            consumer=consumer.id,
            key_id="k",
            model="llama3",
            tokens_in=seq,
            tokens_out=seq,
            amount=seq * 10,
            price_seq=1,
            seq=seq,
            prev=prev,
        )
        receipts.append(r)
        prev = receipt_hash(r)
    return receipts


def test_a_statement_with_an_earlier_iat_does_not_reopen_a_settled_period(
    tmp_path: Path,
) -> None:
    provider, consumer = Node(7), Node(8)
    a, b = sorted((provider, consumer), key=lambda node: node.id)
    receipts = chain(provider, consumer, 4)

    def statement(covered: list[Receipt], previous, now: int):  # type: ignore[no-untyped-def]
        a_to_b, b_to_a = (covered, []) if provider is a else ([], covered)
        s = make_statement(a_to_b, b_to_a, a.id, b.id, previous=previous, now=now)
        return sign_statement(sign_statement(s, a.sign, "a"), b.sign, "b")

    first = statement(receipts[:2], None, now=2_000_000_000)
    # The next period's statement, signed by a node whose clock is behind.
    second = statement(receipts[2:], first, now=1_999_999_000)

    async def run() -> None:
        async with opened(tmp_path / "db") as store:
            await keep_receipts(store, receipts)
            for s in (first, second):
                body = msgspec.json.encode(msgspec.to_builtins(s)).decode()
                await store.ledger.add_settlement(s.a, s.b, s.to_seq, s.iat, body)
            rows = await books_balance(store, consumer.id)
            assert [(row.we_used, row.receipts) for row in rows] == [(0, 0)]
            pair = await open_pair(store, consumer.id, provider.id)
            assert pair.previous == second and pair.theirs == []

    asyncio.run(run())


def test_verify_names_a_statement_both_signed_over_totals_our_receipts_do_not_give(
    tmp_path: Path,
) -> None:
    provider, consumer = Node(7), Node(8)
    a, b = sorted((provider, consumer), key=lambda node: node.id)
    receipts = chain(provider, consumer, 3)
    a_to_b, b_to_a = (receipts, []) if provider is a else ([], receipts)
    honest = make_statement(a_to_b, b_to_a, a.id, b.id, previous=None)
    # Both signed it, but it states more than the receipts of its period add up to.
    if provider is a:
        padded = msgspec.structs.replace(honest, b_owes_a=honest.b_owes_a + 5, net=honest.net - 5)
    else:
        padded = msgspec.structs.replace(honest, a_owes_b=honest.a_owes_b + 5, net=honest.net + 5)
    signed = sign_statement(sign_statement(padded, a.sign, "a"), b.sign, "b")

    async def run() -> None:
        async with opened(tmp_path / "db") as store:
            await keep_receipts(store, receipts)
            body = msgspec.json.encode(msgspec.to_builtins(signed)).decode()
            await store.ledger.add_settlement(signed.a, signed.b, signed.to_seq, signed.iat, body)
            checks = await books_verify(store)
            assert [c.ok for c in checks] == [True, False]
            assert "differs from our receipts in" in (checks[1].problem or "")

    asyncio.run(run())
