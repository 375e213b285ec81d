"""Reconciling a chain page by page (`ledger.reconcile_pages`) gives the answers reconciling the
whole chains gives, whatever the two sides' page sizes; a peer whose pages go backwards, or
carry another chain's receipts, has those refused and never compared, and the merge ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from ledger.receipts import Receipt
from ledger.reconcile import BUCKETS, Reconciliation, reconcile
from ledger.reconcile_pages import windows
from tests.test_ledger import A_TO_B, A_TO_B_PLAIN, B_TO_A, POOL, SETTINGS, A, B, build_chain

CHAIN = (A.id, B.id)
# A second receipt A signed for each seq (equivocation), and copies altered after signing.
TWINS = build_chain(A, B, [5 + i for i in range(POOL)], tag="-twin")
ALTERED = [msgspec.structs.replace(r, amount=r.amount + 1) for r in A_TO_B]
PLACES = [
    "both",
    "both plain",
    "ours plain",
    "theirs plain",
    "ours",
    "theirs",
    "none",
    "altered",
    "twin",
]


def copies(places: list[str]) -> tuple[list[Receipt], list[Receipt]]:
    """Our copy and the peer's copy of the chain A → B, each seq as its place says."""
    ours, theirs = [], []
    for i, place in enumerate(places):
        full, plain = A_TO_B[i], A_TO_B_PLAIN[i]
        mine = {"both plain": plain, "ours plain": plain, "theirs plain": full}.get(place, full)
        peer = {"both plain": plain, "theirs plain": plain, "ours plain": full}.get(place, full)
        peer = {"altered": ALTERED[i], "twin": TWINS[i]}.get(place, peer)
        if place not in ("theirs", "none"):
            ours.append(mine)
        if place not in ("ours", "none"):
            theirs.append(peer)
    return ours, theirs


async def pages(receipts: list[Receipt], size: int) -> AsyncIterator[list[Receipt]]:
    for start in range(0, len(receipts), size):
        yield receipts[start : start + size]


def paged(
    ours: AsyncIterator[list[Receipt]], theirs: AsyncIterator[list[Receipt]]
) -> Reconciliation:
    """Every window reconciled, the answers put end to end."""

    async def run() -> Reconciliation:
        whole = Reconciliation()
        async for window in windows(CHAIN, ours, theirs):
            part = reconcile(window.ours, window.theirs, between=CHAIN)
            part.rejected += window.rejected
            for name in [*BUCKETS, "csig_for_ours", "csig_for_theirs", "merged"]:
                getattr(whole, name).extend(getattr(part, name))
        return whole

    return asyncio.run(run())


@SETTINGS
@given(
    st.lists(st.sampled_from(PLACES), min_size=POOL, max_size=POOL),
    st.integers(1, POOL + 1),
    st.integers(1, POOL + 1),
)
def test_paged_reconciliation_answers_as_the_whole_chains_do(places, our_page, their_page):
    ours, theirs = copies(places)
    whole = reconcile(ours, theirs, between=CHAIN)
    result = paged(pages(ours, our_page), pages(theirs, their_page))
    assert result == whole


def test_a_dispute_on_the_page_boundary_is_compared_once():
    places = ["both"] * POOL
    places[3] = "both plain"  # the last of our first page, the first of the peer's second
    ours, theirs = copies(places)
    result = paged(pages(ours, 4), pages(theirs, 3))
    assert [r.seq for r in result.disputed] == [4]
    assert len(result.matched) == POOL - 1 and not result.rejected


def test_a_peers_pages_going_backwards_or_off_the_chain_are_refused():
    async def hostile() -> AsyncIterator[list[Receipt]]:
        yield A_TO_B[5:8]
        yield [A_TO_B[2], B_TO_A[8], A_TO_B[8]]  # back to seq 3; the other chain's seq 9
        yield []
        yield A_TO_B[9:]

    result = paged(pages(A_TO_B, 3), hostile())
    assert sorted(r.receipt.seq for r in result.rejected) == [3, 9]
    reasons = {r.reason for r in result.rejected}
    assert any("out of seq order" in why for why in reasons)
    assert any("other chain" in why for why in reasons)
    assert [r.seq for r in result.matched] == [6, 7, 8, 9, 10]
    assert [r.seq for r in result.missing_theirs] == [1, 2, 3, 4, 5]
