"""Paged reconciliation with a real peer: bob's books (SQLite, or PostgreSQL) reconciled with
alice's running node over real HTTP, seven receipts a page on both sides, give the answers
reconciling the whole chains gives (agreed, disputed on a page boundary, missing on either
side, a countersignature only one side has, an altered copy), and leave both books holding
what can be agreed. A page size out of bounds is refused in OpenAI's error shape. The memory
a pair's reconciliation takes, and reading its open period (settlement, balance), does not
grow with its chains (tracemalloc, 1,000 and 10,000 receipts, 200 a page). A peer whose pages
do not move forward ends its chain instead of keeping bob asking. `ledger verify` names a
break past the first page where it is in the chain."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import httpx
import msgspec
import pytest

from bench.scale import chains
from bench.scale import reconcile as reconcile_bench
from federation.identity import NodeIdentity
from ledger.receipts import (
    GENESIS,
    Receipt,
    countersign,
    make_receipt,
    receipt_fields,
    receipt_hash,
)
from ledger.reconcile import reconcile
from node.config import DATABASE_FILE, IDENTITY_FILE
from node.peers.books.balance import PairBalance
from node.peers.books.balance import balance as books_balance
from node.peers.books.link import Link, PeerAnswer, link_to
from node.peers.books.period import OpenPeriod, open_period
from node.peers.books.reconciliation import Bucket, ReconcileReport, reconcile_with
from node.peers.books.verify import ChainCheck
from node.peers.books.verify import verify as books_verify
from node.peers.books.wire import PAGE as BOOKS_PAGE
from node.peers.receipts import keep_receipt, loaded, stored
from node.storage import open_store
from node.storage.base import Store
from node.storage.copy import copy_sqlite_to_postgres
from tests.postgres import PASSWORD_ENV, open_test_store
from tests.test_federation import LLAMA, cli, invite, make_peer

PAGE = 7
MEMORY_PAGE = 200
ALICE_TO_BOB, BOB_TO_ALICE = 50, 30


def signed_chain(provider: NodeIdentity, consumer: NodeIdentity, count: int) -> list[Receipt]:
    chain, prev = [], GENESIS
    for seq in range(1, count + 1):
        r = make_receipt(
            provider.sign,
            id=f"req-pages-{provider.node_id[8:14]}-{seq}",
            provider=provider.node_id,
            consumer=consumer.node_id,
            key_id="k-pages",
            model="llama3",
            tokens_in=seq,
            tokens_out=2 * seq,
            amount=100 + seq,
            price_seq=1,
            seq=seq,
            prev=prev,
        )
        prev = receipt_hash(r)
        chain.append(countersign(r, consumer.sign))
    return chain


def plain(r: Receipt) -> Receipt:
    return msgspec.structs.replace(r, csig="")


def copies(alice: NodeIdentity, bob: NodeIdentity) -> tuple[list[Receipt], list[Receipt]]:
    """Bob's and alice's copies of both chains, differing as a long-lived pair's might."""
    ab, ba = signed_chain(alice, bob, ALICE_TO_BOB), signed_chain(bob, alice, BOB_TO_ALICE)
    bobs = {r.seq: r for r in ab}
    alices = dict(bobs)
    for seq in (7, 8):  # never countersigned: the last of a page and the first of the next
        bobs[seq] = alices[seq] = plain(ab[seq - 1])
    bobs[14] = plain(ab[13])  # alice has bob's countersignature, bob lost it
    alices[20] = plain(ab[19])  # bob's countersignature never reached alice
    for seq in (30, 31, 32):
        del alices[seq]  # lost by alice
    del bobs[40], bobs[41]  # lost by bob: 41 comes back (bob's countersignature is its record)
    alices[40] = plain(ab[39])  # and 40 is refused: it bills no request bob holds
    alices[45] = msgspec.structs.replace(ab[44], amount=ab[44].amount + 1)  # altered
    bobs_ba = {r.seq: r for r in ba}
    alices_ba = dict(bobs_ba)
    del bobs_ba[5], bobs_ba[6]  # bob's own, lost: recovered from alice's copy
    del alices_ba[21]
    bobs_ba[28] = alices_ba[28] = plain(ba[27])
    return [*bobs.values(), *bobs_ba.values()], [*alices.values(), *alices_ba.values()]


def insert(database: Path, receipts: list[Receipt]) -> None:
    rows = [stored(r) for r in receipts]
    chains.write(database, rows)


def held(database: Path) -> set[tuple]:
    with sqlite3.connect(database) as db:
        return set(
            db.execute("SELECT provider, consumer, seq, hash, csig IS NOT NULL FROM receipts")
        )


async def held_in(store: Store, me: str, peer: str) -> set[tuple]:
    rows = [*await store.ledger.receipts(me, peer), *await store.ledger.receipts(peer, me)]
    return {(r.provider, r.consumer, r.seq, r.hash, r.csig is not None) for r in rows}


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


def test_long_chains_reconcile_page_by_page_with_a_real_peer(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    alice_node, bob_node = make_peer(tmp_path, "alice", LLAMA), make_peer(tmp_path, "bob")
    with alice_node.run(), bob_node.run():
        cli("join", invite(alice_node), "--data-dir", str(bob_node.path))
    alice = NodeIdentity.load(alice_node.path / IDENTITY_FILE)
    bob = NodeIdentity.load(bob_node.path / IDENTITY_FILE)
    ours, theirs = copies(alice, bob)
    insert(alice_node.path / DATABASE_FILE, theirs)
    insert(bob_node.path / DATABASE_FILE, ours)
    url = str(bob_node.path / DATABASE_FILE)
    if backend == "postgresql":
        url = request.getfixturevalue("postgres_url")
        asyncio.run(
            copy_sqlite_to_postgres(bob_node.path / DATABASE_FILE, url, os.environ[PASSWORD_ENV])
        )
    whole = reconcile(ours, theirs, between=(bob.node_id, alice.node_id)).totals()

    async def reconciled(store: Store, client: httpx.AsyncClient) -> ReconcileReport:
        link = await link_to(store, bob, client, alice.node_id)

        async def keep(receipt: Receipt) -> bool:
            return await keep_receipt(store, receipt)

        return await reconcile_with(store, link, keep, page=PAGE)

    async def run() -> tuple[ReconcileReport, ReconcileReport, set[tuple], list]:
        store = await open_test_store(url)
        try:
            async with httpx.AsyncClient() as client:
                link = await link_to(store, bob, client, alice.node_id)
                refusals = [
                    await link.get(f"/federation/receipts?provider={alice.node_id}&limit={bad}")
                    for bad in ("0", "1001", "abc", "99999999999999999999", "-1", "7.5")
                ]
                small = await link.get(f"/federation/receipts?provider={alice.node_id}&limit=7")
                first = await reconciled(store, client)
                second = await reconciled(store, client)
            return (
                first,
                second,
                await held_in(store, bob.node_id, alice.node_id),
                [
                    *refusals,
                    small,
                ],
            )
        finally:
            await store.close()

    with alice_node.run():
        first, second, bobs, answers = asyncio.run(run())
    *refusals, small = answers
    for answer in refusals:
        assert answer.status_code == 400
        assert msgspec.json.decode(answer.content)["error"]["param"] == "limit"
    page = msgspec.json.decode(small.content)
    assert len(page["receipts"]) == PAGE and page["more"] is True

    def counts(report: ReconcileReport) -> dict[str, int]:
        return {name: getattr(report, name).count for name in whole}

    # What the whole chains give, page by page: alice's receipt 40 bills no request of bob's
    # (refused, not recovered); bob's own 5 and 6, and 41 he countersigned, come back.
    assert counts(first) == {
        "matched": 50 + 30 - 3 - 4 - 4 - 1,
        "disputed": 3,
        "missing_ours": 3,
        "missing_theirs": 4,
        "mismatched": 1,
        "equivocation": 0,
        "rejected": 1,
    }
    for name in ("matched", "disputed", "missing_theirs", "mismatched", "equivocation"):
        assert getattr(first, name) == Bucket(*whole[name]), name
    assert whole["missing_ours"].count == 4 and not first.suspended
    # Both books now hold what could be agreed, countersignatures too: all but alice's
    # altered 45 (each keeps its own) and her 40 that bills no request of bob's (bob's 21,
    # which alice lost, came back: her own countersignature is its record).
    alices = held(alice_node.path / DATABASE_FILE)
    ab = (alice.node_id, bob.node_id)
    assert {k[:3] for k in bobs ^ alices} == {(*ab, 40), (*ab, 45)}
    assert counts(second) == dict(counts(first), matched=68 + 7, missing_ours=0, missing_theirs=0)


class Peaks(NamedTuple):
    reconcile: int  # bytes of traced memory at most
    period: int
    report: ReconcileReport
    opened: OpenPeriod
    balance: PairBalance


async def _peaks(tmp_path: Path, receipts: int) -> Peaks:
    """Peak traced memory of bob reconciling with alice, who hold the same `receipts`-long
    chain alice → bob (written straight into both stores), and of bob reading the open
    period (what settling reads; `ledger balance` sums the same pages). Alice answers in
    this process by the functions her routes call (`bench.scale.reconcile.InProcessPeer`),
    so that tracemalloc sees both sides and 10,000 receipts take seconds."""
    folder = tmp_path / str(receipts)
    folder.mkdir()
    pair = await reconcile_bench.open_pair(folder, receipts)
    me, peer = pair.link.identity.node_id, pair.link.peer.node_id
    try:
        tracemalloc.start()
        report = await reconcile_bench.reconciled(pair, MEMORY_PAGE)
        _, reconciling = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        opened = await open_period(pair.bob, me, peer, page=MEMORY_PAGE)
        _, reading = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        (balance,) = await books_balance(pair.bob, me)
    finally:
        tracemalloc.stop()
        await pair.close()
    return Peaks(reconciling, reading, report, opened, balance)


def test_reconciling_a_pair_takes_memory_that_does_not_grow_with_its_chains(
    tmp_path: Path,
) -> None:
    small = asyncio.run(_peaks(tmp_path, 1_000))
    large = asyncio.run(_peaks(tmp_path, 10_000))
    assert small.report.matched.count == 1_000 and large.report.matched.count == 10_000
    assert large.report.missing_ours.count == large.report.missing_theirs.count == 0
    print(
        f"peak traced memory: reconciling {small.reconcile / 1e6:.1f} MB (1,000),"
        f" {large.reconcile / 1e6:.1f} MB (10,000); the open period {small.period / 1e6:.1f} MB,"
        f" {large.period / 1e6:.1f} MB"
    )
    # Ten times the receipts; the whole chains would take ten times the memory.
    assert large.reconcile < 1.25 * small.reconcile
    assert large.period < 1.25 * small.period
    # The period's totals and head, page by page, are the whole chain's.
    amount = sum(10 + seq % 7 for seq in range(1, 10_001))  # as bench/scale/chains.py bills
    alice_to_bob = large.opened.a_to_b if large.opened.a != large.opened.me else large.opened.b_to_a
    assert (alice_to_bob.count, alice_to_bob.amount) == (10_000, amount)
    assert alice_to_bob.head[0] == 10_000 and large.opened.broken is None
    assert (large.balance.we_used, large.balance.receipts) == (amount, 10_000)
    # Bob holds no request these placeholder receipts bill: settling would be refused.
    assert large.opened.unbilled == 10_000


@dataclass
class StuckPeer(Link):
    """A peer that answers every page of its chain with the same three receipts and
    `more: true`, and takes nothing it is sent."""

    receipts: list[dict] = field(default_factory=list)
    asked: int = 0

    async def _ask(self, method: str, path: str, body: bytes = b"") -> PeerAnswer:
        if method == "POST":
            return PeerAnswer(200, b'{"taken": 0}')
        if path.startswith("/federation/settlements"):
            return PeerAnswer(200, b'{"statements": [], "more": false}')
        self.asked += 1
        assert self.asked < 10, "the peer kept bob asking"
        return PeerAnswer(200, msgspec.json.encode({"receipts": self.receipts, "more": True}))


def test_a_peer_whose_pages_do_not_move_forward_ends_its_chain(tmp_path: Path) -> None:
    async def run() -> tuple[ReconcileReport, int]:
        pair = await reconcile_bench.open_pair(tmp_path, 5)
        rows = await pair.alice.ledger.receipts(pair.link.peer.node_id, pair.link.identity.node_id)
        stuck = StuckPeer(
            pair.link.identity,
            pair.link.client,
            pair.link.peer,
            "",
            None,
            [receipt_fields(loaded(row)) for row in rows[:3]],
        )
        try:
            return await reconcile_with(pair.bob, stuck, keep=_nothing), stuck.asked
        finally:
            await pair.close()

    report, asked = asyncio.run(run())
    # Each chain ends at the page that repeats the last: two pages each. Asked for bob's
    # chain it shows alice's receipts (not of the chain asked for: rejected, twice); of
    # alice's, the repeated page's copies are rejected too, never compared again.
    assert asked == 2 + 2
    assert report.matched.count == 3 and report.missing_theirs.count == 2
    assert report.rejected.count == 3 + 3 + 3


async def _nothing(receipt: Receipt) -> bool:
    raise AssertionError("nothing is recovered from a stuck peer")


def test_ledger_verify_reads_a_chain_page_by_page_and_names_where_it_breaks(
    tmp_path: Path,
) -> None:
    alice, bob = NodeIdentity.generate(), NodeIdentity.generate()
    chain = signed_chain(alice, bob, BOOKS_PAGE + 500)
    tampered = [stored(r) for r in chain]
    tampered[1199] = stored(msgspec.structs.replace(chain[1199], amount=1))  # seq 1200

    async def checks(database: Path, rows: list) -> list[ChainCheck]:
        store = await open_store(database)
        try:
            chains.write(database, rows)
            return await books_verify(store)
        finally:
            await store.close()

    (whole,) = asyncio.run(checks(tmp_path / "whole.db", [stored(r) for r in chain]))
    assert whole.ok and whole.receipts == BOOKS_PAGE + 500
    (broken,) = asyncio.run(checks(tmp_path / "tampered.db", tampered))
    assert not broken.ok and broken.receipts == BOOKS_PAGE + 500
    assert broken.problem is not None and "receipt #1199 (seq 1200)" in broken.problem
