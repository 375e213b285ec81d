"""A process promises budget from its leases only while its last renewal is fresh
(`node/gateway/budgets.py`: LEASE_FRESH, below HOLD_TTL, after which other processes give a
silent process's holds back), and admits from its parallel slots only while its last sync is
(`node/gateway/ratelimit.py`: SLOTS_FRESH, below SLOT_TTL). Run on both backends, with the
process's clock moved by the test and the store's prune told a later time, as a process whose
renewals failed would see it."""

from __future__ import annotations

import asyncio
import time

import pytest

from node.errors import HubError
from node.gateway.auth import Principal
from node.gateway.budgets import LEASE_FRESH, Budgets
from node.gateway.policy import Limits, period_start
from node.gateway.ratelimit import RateLimited, RateLimiter, ScopeLimits
from node.storage.base import Store
from node.storage.records import (
    HOLD_TTL,
    SLOT_TTL,
    KeyRecord,
    RateAnswer,
    RateSync,
    StoreUnavailable,
)
from tests.postgres import open_test_store

CAP = 10_000
COST = 100


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def principal() -> Principal:
    limits = Limits(budget_micros=CAP, budget_period="monthly")
    return Principal(KeyRecord("k1", "budgeted", b"\x00h", False, 1, limits=limits))


async def reserved(store: Store) -> int:
    (row,) = await store.spend.spend([("key:k1", period_start("monthly", time.time()))])
    return row.reserved


def run(store_url: str, test) -> None:  # type: ignore[no-untyped-def]
    async def go() -> None:
        store = await open_test_store(store_url)
        try:
            await test(store)
        finally:
            await store.close()

    asyncio.run(go())


def test_a_stale_lease_is_not_promised_from_while_the_store_is_away(store_url: str) -> None:
    async def test(store: Store) -> None:
        clock = Clock()
        budgets = Budgets(store, clock=clock)
        who = principal()
        await budgets.reserve(who, COST)  # a lease of many requests' worth, reserved
        leased = await reserved(store)
        assert leased > 2 * COST
        clock.now += LEASE_FRESH / 2
        await budgets.reserve(who, COST)  # fresh: from the lease, nothing asked
        assert await reserved(store) == leased

        # The renewals fail from here on; past LEASE_FRESH the lease is not used.
        async def away(holder: str, now: int) -> set[tuple[str, int]]:
            raise StoreUnavailable("the database cannot be reached: test")

        renew, store.spend.renew_holds = store.spend.renew_holds, away  # type: ignore[method-assign]
        clock.now += LEASE_FRESH
        with pytest.raises(StoreUnavailable):
            await budgets.reserve(who, COST)
        store.spend.renew_holds = renew  # type: ignore[method-assign]
        await budgets.reserve(who, COST)  # back: renewed, and served from the same lease
        assert await reserved(store) == leased

    run(store_url, test)


def test_a_lease_given_back_by_others_is_dropped_not_spent(store_url: str) -> None:
    """The process could not renew for HOLD_TTL: another process's prune gave its holds
    back. Its next request renews first, finds nothing held, and leases anew: the database's
    reservation is the new lease and the requests in flight, never the old lease twice."""

    async def test(store: Store) -> None:
        clock = Clock()
        budgets = Budgets(store, clock=clock)
        who = principal()
        in_flight = await budgets.reserve(who, COST)
        assert await reserved(store) > COST
        await store.prune(int(time.time()) + HOLD_TTL + 1)  # its holds expired: given back
        assert await reserved(store) == 0
        clock.now += LEASE_FRESH
        await budgets.reserve(who, COST)
        fresh = await reserved(store)
        assert 0 < fresh <= CAP // 10  # one new lease (a tenth of the cap at most)
        # The request in flight settles: its spend is added, its hold (given back) is not
        # taken off the new lease's reservation.
        budgets.settle(in_flight, COST)
        # Keys reloaded: the lease is given back, at most what this process holds.
        budgets.forget()
        await budgets.release()
        assert await reserved(store) == COST  # the second request's, still in flight
        with pytest.raises(HubError):  # and the cap is still the cap
            await budgets.reserve(who, CAP)

    run(store_url, test)


def test_parallel_slots_are_not_used_once_others_may_count_them_free(store_url: str) -> None:
    """A process cut off from the store for longer than SLOT_TTL: the others count its
    slots free and take them. It stops admitting from its own after SLOTS_FRESH (the request
    syncs first: unavailable while the store is away), and once back it finds its slots
    expired and takes new ones under the limit, counting what is in flight everywhere."""

    async def test(store: Store) -> None:
        other = await open_test_store(store_url)  # another process's connection
        try:
            await _cut_off_process(store, other)
        finally:
            await other.close()

    run(store_url, test)


async def _cut_off_process(store: Store, other: Store) -> None:
    wall, fresh = Clock(), Clock()
    wall.now = time.time()
    scope = ScopeLimits("key:k1", max_parallel=4)
    cut = RateLimiter(store, clock=wall, fresh_clock=fresh)
    first = await cut.admit([scope])
    second = await cut.admit([scope])
    cut.release(second, 0)  # one in flight, one slot held idle

    async def away(sync: RateSync) -> RateAnswer:
        raise StoreUnavailable("the database cannot be reached: test")

    sync, store.spend.rate_sync = store.spend.rate_sync, away  # type: ignore[method-assign]
    wall.now += SLOT_TTL + 1
    fresh.now += SLOT_TTL + 1
    others = RateLimiter(other, clock=wall)
    # The cut process's slots expired: the others count them free, and take three of four.
    taken = [await others.admit([scope]) for _ in range(3)]
    with pytest.raises(StoreUnavailable):  # not from its idle slot, which they count free
        await cut.admit([scope])
    store.spend.rate_sync = sync  # type: ignore[method-assign]
    with pytest.raises(RateLimited):  # back: its slots had expired, and 3 + 1 are in flight
        await cut.admit([scope])
    for admission in taken:
        others.release(admission, 0)
    await others.sync()
    cut.release(await cut.admit([scope]), 0)  # a slot freed by the others: taken anew
    cut.release(first, 0)
