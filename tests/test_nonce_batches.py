"""The durable nonce claims of one turn of the event loop are written in one transaction, on
each backend, and each request is still told whether its own nonce was new: a nonce claimed
twice in one turn (or by two processes at once) is admitted exactly once, one bad claim costs
no other claim its answer, and a requester cancelled mid-write costs the others nothing."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.nonces import nonce_digest
from node.peers.nonce_claims import NonceClaims
from node.storage import open_store
from node.storage.base import Store
from tests.postgres import open_test_store

NOW = 1_000


def counting(store: Store) -> list[int]:
    """The size of each transaction the store is asked to claim nonces in."""
    sizes: list[int] = []
    claim = store.peers.claim_nonces

    async def counted(claims, now):  # type: ignore[no-untyped-def]
        sizes.append(len(claims))
        return await claim(claims, now)

    store.peers.claim_nonces = counted  # type: ignore[method-assign]
    return sizes


def pair(n: int) -> bytes:
    return nonce_digest("httpsig", "ed25519:peer", f"nonce-{n:012d}")


async def test_the_same_nonce_twice_in_one_turn_is_admitted_once(store_url: str) -> None:
    """A replay that reaches the store in the same turn as the original (sent to this
    process past its memory, or the memory full): one admitted, the other refused, where
    a batch that answered each request by whether its pair came out new would admit both."""
    store = await open_test_store(store_url)
    sizes = counting(store)
    claims = NonceClaims(store)
    try:
        await claims.claim(pair(99), NOW + 300, NOW)  # claimed in an earlier turn
        asked = [pair(n % 4) for n in range(12)] + [pair(99), pair(5)]
        answers = await asyncio.gather(*(claims.claim(p, NOW + 300, NOW) for p in asked))
        assert sizes[1:] == [len(asked)]  # this turn's claims in one transaction
        for n in range(4):
            theirs = [a for p, a in zip(asked, answers, strict=True) if p == pair(n)]
            assert theirs == [True, False, False]  # the first to ask is the one admitted
        assert answers[-2:] == [False, True]  # already recorded; new
        # And each is refused from then on, by the store alone.
        for p in {*asked}:
            assert not await store.peers.claim_nonce(p, NOW + 300, NOW + 1)
    finally:
        await claims.settle()
        await store.close()


async def test_two_processes_claiming_one_nonce_in_their_batches_admit_it_once(
    store_url: str,
) -> None:
    """Two processes of one node (two stores on one database), each claiming a batch in which
    the same nonces appear, at once: each nonce is admitted by exactly one of them."""
    stores = [await open_test_store(store_url), await open_test_store(store_url)]
    claimers = [NonceClaims(store) for store in stores]
    try:
        asked = [(c, pair(n)) for n in range(10) for c in (0, 1)]
        answers = await asyncio.gather(
            *(claimers[c].claim(p, NOW + 300, NOW) for c, p in reversed(asked))
        )
        admitted = [p for (_, p), a in zip(reversed(asked), answers, strict=True) if a]
        assert sorted(admitted) == sorted(pair(n) for n in range(10))
    finally:
        for claimer, store in zip(claimers, stores, strict=True):
            await claimer.settle()
            await store.close()


async def test_one_bad_claim_costs_no_other_claim_its_answer(store_url: str) -> None:
    """An expiry the store cannot hold fails its own claim only: the batch is claimed again
    one by one, and the others are answered (and recorded)."""
    store = await open_test_store(store_url)
    claims = NonceClaims(store)
    try:
        expiries = [NOW + 300, 2**70, NOW + 300, NOW + 300]
        answers = await asyncio.gather(
            *(claims.claim(pair(n), e, NOW) for n, e in enumerate(expiries)),
            return_exceptions=True,
        )
        assert isinstance(answers[1], Exception) and not isinstance(answers[1], bool)
        assert [answers[n] for n in (0, 2, 3)] == [True, True, True]
        assert await store.peers.claim_nonce(pair(1), NOW + 300, NOW)  # nothing kept of it
        for n in (0, 2, 3):
            assert not await store.peers.claim_nonce(pair(n), NOW + 300, NOW)
    finally:
        await claims.settle()
        await store.close()


async def test_the_gatherer_cancelled_mid_write_costs_the_others_nothing(store_url: str) -> None:
    """The first claim of a turn writes the turn's claims; cancelled while they are written
    (its peer hung up), the others still get their answers, and its own nonce stays claimed
    (it is used: a replay of it is refused)."""
    store = await open_test_store(store_url)
    writing, release = asyncio.Event(), asyncio.Event()
    claim = store.peers.claim_nonces

    async def slow(claims, now):  # type: ignore[no-untyped-def]
        writing.set()
        await release.wait()
        return await claim(claims, now)

    store.peers.claim_nonces = slow  # type: ignore[method-assign]
    claims = NonceClaims(store)
    try:
        first = asyncio.ensure_future(claims.claim(pair(0), NOW + 300, NOW))
        others = [asyncio.ensure_future(claims.claim(pair(n), NOW + 300, NOW)) for n in (1, 2)]
        await writing.wait()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        release.set()
        assert await asyncio.gather(*others) == [True, True]
        await claims.settle()
        for n in range(3):
            assert await claim([(pair(n), NOW + 300)], NOW) == [False]
    finally:
        release.set()
        await claims.settle()
        await store.close()


batches = st.lists(
    st.lists(
        st.tuples(
            st.integers(0, 3),  # nonce
            st.integers(-5, 40),  # expires, relative to the batch's now
            st.integers(0, 1),  # which process
        ),
        max_size=8,
    ),
    max_size=12,
)


@settings(max_examples=60, deadline=None, database=None)
@given(batches, st.lists(st.integers(0, 30), min_size=12, max_size=12))
def test_batched_claims_answer_as_claims_one_by_one_would(batches, clocks) -> None:
    """Any batches over two processes, the clock going back and forth: a claim in a batch is
    accepted exactly when its pair is not earlier in the batch and no accepted claim of it in
    an earlier batch is still unexpired at the batch's `now`."""

    async def run() -> None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "aihub.db"
            stores = [await open_store(path), await open_store(path)]
            try:
                kept: dict[bytes, int] = {}
                for batch, now in zip(batches, clocks, strict=False):
                    for which in (0, 1):
                        mine = [(pair(n), now + ttl) for n, ttl, w in batch if w == which]
                        answers = await stores[which].peers.claim_nonces(mine, now)
                        seen: set[bytes] = set()
                        for (p, expires), fresh in zip(mine, answers, strict=True):
                            assert fresh == (p not in seen and (p not in kept or kept[p] < now))
                            seen.add(p)
                            if fresh:
                                kept[p] = expires
            finally:
                for store in stores:
                    await store.close()

    asyncio.run(run())
