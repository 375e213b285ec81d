"""Properties of what the store decides for every process of a node: a nonce is accepted at
most once while unexpired, and rate-limit leases never let two processes together pass a
limit. Two `Store` connections to one database file stand for two processes."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from hypothesis import given, settings
from hypothesis import strategies as st

from federation.nonces import nonce_digest
from node.gateway.ratelimit import Admission, RateLimited, RateLimiter, ScopeLimits
from node.storage import open_store
from node.storage.base import Store

SETTINGS = settings(max_examples=60, deadline=None, database=None)
T = TypeVar("T")

claims = st.lists(
    st.tuples(
        st.sampled_from(["ed25519:a", "ed25519:b"]),  # keyid
        st.sampled_from(["n" * 16, "m" * 16, "o" * 16]),  # nonce
        st.integers(-5, 40),  # expires, relative to now
        st.integers(0, 100),  # now
        st.integers(0, 1),  # which process
    ),
    max_size=40,
)


def with_stores(work: Callable[[list[Store]], Awaitable[T]]) -> T:
    """Run `work` with two stores on one fresh database file."""

    async def run() -> T:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "aihub.db"
            stores = [await open_store(path), await open_store(path)]
            try:
                return await work(stores)
            finally:
                for store in stores:
                    await store.close()

    return asyncio.run(run())


@SETTINGS
@given(claims)
def test_a_nonce_is_accepted_at_most_once_while_unexpired(ops) -> None:
    """Any sequence of (keyid, nonce, expires, now), the clock going back and forth, over
    two processes: a claim is accepted exactly when no accepted claim of that pair is still
    unexpired at its `now`."""

    async def work(stores: list[Store]) -> None:
        kept: dict[bytes, int] = {}  # pair -> expiry of its accepted claim
        for keyid, nonce, ttl, now, which in ops:
            pair = nonce_digest("httpsig", keyid, nonce)
            fresh = await stores[which].peers.claim_nonce(pair, now + ttl, now)
            assert fresh == (pair not in kept or kept[pair] < now)
            if fresh:
                kept[pair] = now + ttl

    with_stores(work)


@SETTINGS
@given(claims, st.lists(st.booleans(), min_size=40, max_size=40))
def test_pruning_never_forgets_a_nonce_that_could_still_be_replayed(ops, prunes) -> None:
    """The same, with the clock only going forward (as pruning's own clock does) and the
    store pruned between any two claims."""
    ordered = sorted(ops, key=lambda op: op[3])

    async def work(stores: list[Store]) -> None:
        kept: dict[bytes, int] = {}
        for (keyid, nonce, ttl, now, which), prune in zip(ordered, prunes, strict=False):
            if prune:
                await stores[1 - which].prune(now)
            pair = nonce_digest("httpsig", keyid, nonce)
            fresh = await stores[which].peers.claim_nonce(pair, now + ttl, now)
            assert fresh == (pair not in kept or kept[pair] < now)
            if fresh:
                kept[pair] = now + ttl

    with_stores(work)


steps = st.lists(
    st.tuples(
        st.integers(0, 1),  # which process
        st.sampled_from(["admit", "admit", "admit", "release", "sync"]),
        st.sampled_from([0.0, 0.0, 0.3, 1.0, 7.5, 30.0]),  # clock advance first
    ),
    max_size=60,
)


@SETTINGS
@given(steps, st.integers(1, 12), st.integers(1, 4))
def test_two_processes_never_pass_rpm_or_max_parallel_together(ops, rpm, parallel) -> None:
    """Admissions, releases and syncs in any order over two processes sharing one store: no
    minute ever holds more than `rpm` admissions, nor any moment more than `parallel`
    requests in flight. (A live process syncs every second, which renews its slots: one
    that does not for `SLOT_TTL` seconds is taken for dead, and its slots come back.)"""
    clock = [1_000_000.0]
    limits = [ScopeLimits("key:k", rpm=rpm, max_parallel=parallel)]

    async def work(stores: list[Store]) -> None:
        limiters = [RateLimiter(store, clock=lambda: clock[0]) for store in stores]
        admitted: list[float] = []
        held: list[list[Admission]] = [[], []]
        for which, action, advance in ops:
            clock[0] += advance
            if advance >= 1:  # each live process's schedule syncs it every second
                for each in limiters:
                    await each.sync()
            limiter = limiters[which]
            if action == "sync":
                await limiter.sync()
            elif action == "release":
                if held[which]:
                    limiter.release(held[which].pop(), 0)
            else:
                try:
                    held[which].append(await limiter.admit(limits))
                except RateLimited:
                    continue
                admitted.append(clock[0])
                in_minute = [t for t in admitted if t >= clock[0] - 60]
                assert len(in_minute) <= rpm
                assert len(held[0]) + len(held[1]) <= parallel

    with_stores(work)
