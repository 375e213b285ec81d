"""A usage batch settles its requests' holds together (node/storage/*/usage.py
`write_charges`): the spend rows and holds come out as if each request were settled on its own
(spent grows by every cost; reserved falls by each live holder's amounts and by those of
holds older than holders, and never by those of a holder whose holds were given back), on
both backends; and the SQLite store updates each row once per holder in a batch, not once
per request (a hundred UPDATEs of the same two rows for fifty requests, before)."""

from __future__ import annotations

import time

import pytest

from node.storage.base import Store
from node.storage.records import Charge, Hold
from node.storage.sqlite.store import SqliteStore
from tests.postgres import open_test_store
from tests.test_storage import charge
from tests.test_store_plans import _caught

SCOPES = [("key:k1", 0), ("tenant:t1", 0)]
CAP = 10**9
# Held by each holder before the batch, in each scope. "gone" is given back by a prune (it
# could not renew), "legacy" stands for reservations made before holds named a holder.
HELD = {"alive": 1_000, "gone": 200, "legacy": 300}


def _batch() -> list[Charge]:
    """Fifty requests: thirty of the live holder's, ten of the given-back one's journal, ten
    of a journal older than holders (holder '')."""
    charges = []
    for n in range(50):
        holder = "alive" if n < 30 else "gone" if n < 40 else ""
        amount = 3 + n % 5  # what the request's hold moves from reserved to spent
        holds = [Hold(scope, start, amount, holder) for scope, start in SCOPES]
        charges.append(charge(f"r{n:03d}", amount, holds))
    return charges


async def _held_store(store: Store) -> None:
    now = int(time.time())
    await store.spend.open_periods([(scope, start, CAP) for scope, start in SCOPES])
    for holder, amount in HELD.items():
        assert await store.spend.reserve(amount, SCOPES, holder)
    for holder in ("alive", "legacy"):
        await store.spend.renew_holds(holder, now + 100)
    await store.prune(now + 100)  # "gone" had not renewed: its holds are given back


async def test_a_batch_settles_as_its_requests_would_one_by_one(store_url: str) -> None:
    store = await open_test_store(store_url)
    try:
        await _held_store(store)
        before = {row.scope: row for row in await store.spend.spend(SCOPES)}
        batch = _batch()
        await store.usage.write_batch(batch, [])
        await store.usage.write_batch(batch[:7], [])  # a journal replayed: counted once
        after = {row.scope: row for row in await store.spend.spend(SCOPES)}
        costs = sum(c.record.cost_micros for c in batch)
        live = sum(c.holds[0].amount for c in batch if c.holds[0].holder == "alive")
        legacy = sum(c.holds[0].amount for c in batch if c.holds[0].holder == "")
        for scope, _ in SCOPES:
            assert before[scope].reserved == HELD["alive"] + HELD["legacy"]
            assert after[scope].spent == before[scope].spent + costs
            assert after[scope].reserved == before[scope].reserved - live - legacy
        # What the live holder still holds: giving back more than it has gives back that.
        await store.spend.release([(CAP, scope) for scope in SCOPES], "alive")
        released = {row.scope: row for row in await store.spend.spend(SCOPES)}
        for scope, _ in SCOPES:
            assert after[scope].reserved - released[scope].reserved == HELD["alive"] - live
    finally:
        await store.close()


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_each_row_is_updated_once_per_holder_in_a_batch(store_url: str) -> None:
    store = await open_test_store(store_url)
    assert isinstance(store, SqliteStore)
    try:
        await _held_store(store)
        ran = await _caught(store, lambda: store.usage.write_batch(_batch(), []))
        spend = [sql for sql in ran if sql.lstrip().upper().startswith("UPDATE SPEND")]
        holds = [sql for sql in ran if sql.lstrip().upper().startswith("UPDATE BUDGET_HOLDS")]
        assert len(spend) == len(SCOPES) * 3, spend  # three holders, two scopes
        assert len(holds) == len(SCOPES) * 2, holds  # the holder '' has no holds to update
    finally:
        await store.close()
