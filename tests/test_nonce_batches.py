"""The durable nonce claims asked for while one is being written are written together in one
transaction (`GroupCommit`), on each backend, and each request is still told whether its own
nonce was new: a nonce claimed twice in one batch (or by two processes at once) is admitted
exactly once, one bad claim costs no other claim its answer, and a requester cancelled
mid-write costs the others nothing."""

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


class Held:
    """The store's claims, counted (the size of each transaction), the first one held in
    flight until `release` (a PostgreSQL round trip, or SQLite's thread while another writer
    holds the database): the claims asked for meanwhile wait, and go in the next batch."""

    def __init__(self, store: Store) -> None:
        self.sizes: list[int] = []
        self.writing, self.release = asyncio.Event(), asyncio.Event()
        # And the second write, when this is cleared (set: it goes through).
        self.second_writing, self.second_release = asyncio.Event(), asyncio.Event()
        self.second_release.set()
        self.claim = store.peers.claim_nonces
        store.peers.claim_nonces = self.claims  # type: ignore[method-assign]

    async def claims(self, claims, now):  # type: ignore[no-untyped-def]
        self.sizes.append(len(claims))
        if len(self.sizes) == 1:
            self.writing.set()
            await self.release.wait()
        elif len(self.sizes) == 2:
            self.second_writing.set()
            await self.second_release.wait()
        return await self.claim(claims, now)


def pair(n: int) -> bytes:
    return nonce_digest("httpsig", "ed25519:peer", f"nonce-{n:012d}")


async def test_the_same_nonce_twice_in_one_batch_is_admitted_once(store_url: str) -> None:
    """A replay that reaches the store in the same batch as the original (sent to this
    process past its memory, or the memory full): one admitted, the other refused, where a
    batch that answered each request by whether its pair came out new would admit both."""
    store = await open_test_store(store_url)
    held = Held(store)
    claims = NonceClaims(store)
    try:
        assert await held.claim([(pair(99), NOW + 300)], NOW) == [True]  # an earlier one
        first = asyncio.ensure_future(claims.claim(pair(98), NOW + 300, NOW))
        await held.writing.wait()
        asked = [pair(n % 4) for n in range(12)] + [pair(99), pair(5)]
        waiting = [asyncio.ensure_future(claims.claim(p, NOW + 300, NOW)) for p in asked]
        await asyncio.sleep(0)  # they have all asked
        held.release.set()
        answers = await asyncio.gather(*waiting)
        assert await first is True
        assert held.sizes == [1, len(asked)]  # the first alone, then the rest in one
        for n in range(4):
            theirs = [a for p, a in zip(asked, answers, strict=True) if p == pair(n)]
            assert theirs == [True, False, False]  # the first to ask is the one admitted
        assert answers[-2:] == [False, True]  # already recorded; new
        # The store's own answer to a batch holding a pair twice, and each refused from then on.
        twice = [(pair(7), NOW + 300), (pair(7), NOW + 300), (pair(8), NOW + 300)]
        assert await held.claim(twice, NOW) == [True, False, True]
        for p in {*asked, pair(7), pair(8), pair(98)}:
            assert not await store.peers.claim_nonce(p, NOW + 300, NOW + 1)
    finally:
        held.release.set()
        held.second_release.set()
        await claims.settle()
        await store.close()


async def test_two_processes_claiming_one_nonce_in_their_batches_admit_it_once(
    store_url: str,
) -> None:
    """Two processes of one node (two stores on one database), each claiming a batch of the
    same nonces at once, in opposite orders: each nonce admitted by exactly one of them (and
    on PostgreSQL, neither waits on the other's rows forever)."""
    stores = [await open_test_store(store_url), await open_test_store(store_url)]
    try:
        mine = [(pair(n), NOW + 300) for n in range(10)]
        answers = await asyncio.gather(
            stores[0].peers.claim_nonces(mine, NOW),
            stores[1].peers.claim_nonces(mine[::-1], NOW),
        )
        admitted = [p for (p, _), a in zip(mine, answers[0], strict=True) if a]
        admitted += [p for (p, _), a in zip(mine[::-1], answers[1], strict=True) if a]
        assert sorted(admitted) == sorted(p for p, _ in mine)
    finally:
        for store in stores:
            await store.close()


async def test_one_bad_claim_costs_no_other_claim_its_answer(store_url: str) -> None:
    """An expiry the store cannot hold fails its own claim only: the batch it was in is
    claimed again one by one, and the others are answered (and recorded)."""
    store = await open_test_store(store_url)
    held = Held(store)
    claims = NonceClaims(store)
    try:
        first = asyncio.ensure_future(claims.claim(pair(9), NOW + 300, NOW))
        await held.writing.wait()
        expiries = [NOW + 300, 2**70, NOW + 300, NOW + 300]
        waiting = asyncio.gather(
            *(claims.claim(pair(n), e, NOW) for n, e in enumerate(expiries)),
            return_exceptions=True,
        )
        await asyncio.sleep(0)
        held.release.set()
        answers = await waiting
        assert await first is True
        assert held.sizes[:2] == [1, 4]  # the batch was tried whole first
        assert isinstance(answers[1], Exception) and not isinstance(answers[1], bool)
        assert [answers[n] for n in (0, 2, 3)] == [True, True, True]
        assert await store.peers.claim_nonce(pair(1), NOW + 300, NOW)  # nothing kept of it
        for n in (0, 2, 3):
            assert not await store.peers.claim_nonce(pair(n), NOW + 300, NOW)
    finally:
        held.release.set()
        held.second_release.set()
        await claims.settle()
        await store.close()


async def test_a_requester_cancelled_mid_write_costs_the_others_nothing(store_url: str) -> None:
    """The claims asked for while a batch is written are written by a task of their own: a
    requester cancelled meanwhile (its peer hung up) leaves the others their answers, and
    its own nonce is claimed all the same (a replay of it is refused)."""
    store = await open_test_store(store_url)
    held = Held(store)
    held.second_release.clear()
    claims = NonceClaims(store)
    try:
        first = asyncio.ensure_future(claims.claim(pair(0), NOW + 300, NOW))
        await held.writing.wait()
        batch = [asyncio.ensure_future(claims.claim(pair(n), NOW + 300, NOW)) for n in (1, 2, 3)]
        await asyncio.sleep(0)
        held.release.set()
        await first
        await held.second_writing.wait()  # the batch's task is writing it
        batch[0].cancel()
        with pytest.raises(asyncio.CancelledError):
            await batch[0]
        held.second_release.set()
        assert await asyncio.gather(*batch[1:]) == [True, True]
        await claims.settle()
        assert held.sizes == [1, 3]
        for n in range(4):
            assert await held.claim([(pair(n), NOW + 300)], NOW) == [False]
    finally:
        held.release.set()
        held.second_release.set()
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
