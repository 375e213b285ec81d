"""A key's budget and rate-limit scopes, worked out once per key and kept until the keys
reload: not formatted (`key:<id>`, `tenant:<id>`) and built into lists on every request, and
never kept past a change to the key or its tenant."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import pytest

from node.errors import HubError
from node.gateway.accounting import rate_scopes
from node.gateway.auth import KeyCache, touch_epoch
from node.gateway.budgets import budget_scopes
from node.gateway.keys import generate_key, hash_key
from node.gateway.ratelimit import ScopeLimits
from node.storage.records import AuditEvent, KeyRecord, Limits, TenantRecord

SECRET = b"s" * 32


class _Keys:
    def __init__(self) -> None:
        self.records: list[KeyRecord] = []
        self.tenant_records: list[TenantRecord] = []

    async def keys(self) -> list[KeyRecord]:
        return list(self.records)

    async def tenants(self) -> list[TenantRecord]:
        return list(self.tenant_records)


class _Processes:
    async def epoch(self) -> int:
        return 0


class _Store:
    """What `KeyCache.load` reads."""

    def __init__(self) -> None:
        self.keys = _Keys()
        self.processes = _Processes()


def keyed(tmp_path: Path) -> tuple[KeyCache, _Store, str, str]:
    """A cache over a store holding one key of a tenant: the cache, the store, the key and
    its id."""
    store = _Store()
    key, key_id = generate_key()
    store.keys.tenant_records.append(TenantRecord("t1", "team", Limits(rpm=50), {}, 0))
    limits = Limits(budget_micros=1_000, rpm=10, tpm=1_000)
    record = KeyRecord(key_id, "k", hash_key(SECRET, key), False, 0, "t1", limits)
    store.keys.records.append(record)
    events: list[AuditEvent] = []
    cache = KeyCache(SECRET, store, tmp_path, events.append)  # type: ignore[arg-type]
    cache.trust_until(time.monotonic() + 3600)
    return cache, store, key, key_id


def test_a_keys_scopes_are_worked_out_once_not_per_request(tmp_path: Path):
    """Two requests by one key share its scopes, as exact as ever."""
    cache, _, key, key_id = keyed(tmp_path)

    async def work() -> None:
        first = await cache.authenticate(f"Bearer {key}", "127.0.0.1")
        second = await cache.authenticate(f"Bearer {key}", "127.0.0.1")
        assert budget_scopes(second) is budget_scopes(first)
        assert rate_scopes(second) is rate_scopes(first)
        assert [scope for scope, _ in budget_scopes(first)] == [f"key:{key_id}", "tenant:t1"]
        assert list(rate_scopes(first)) == [
            ScopeLimits(f"key:{key_id}", 10, 1_000, None),
            ScopeLimits("tenant:t1", 50, None, None),
        ]

    asyncio.run(work())


def test_keys_reloaded_are_judged_as_they_are_now(tmp_path: Path):
    """A tenant's limits changed, or its key revoked, elsewhere: the very next request sees
    it (the scopes worked out before the reload are not kept)."""
    cache, store, key, key_id = keyed(tmp_path)

    async def work() -> None:
        before = await cache.authenticate(f"Bearer {key}", "127.0.0.1")
        assert [s.rpm for s in rate_scopes(before)] == [10, 50]
        store.keys.tenant_records[0] = TenantRecord("t1", "team", Limits(tpm=7), {}, 0)
        touch_epoch(tmp_path)
        after = await cache.authenticate(f"Bearer {key}", "127.0.0.1")
        assert list(rate_scopes(after)) == [
            ScopeLimits(f"key:{key_id}", 10, 1_000, None),
            ScopeLimits("tenant:t1", None, 7, None),
        ]
        store.keys.records[0].revoked_at = 1
        touch_epoch(tmp_path)
        with pytest.raises(HubError, match="Incorrect API key"):
            await cache.authenticate(f"Bearer {key}", "127.0.0.1")

    asyncio.run(work())


def test_a_load_that_began_earlier_and_ends_later_does_not_undo_a_newer_one(tmp_path: Path):
    """Two loads overlap (a change heard of while a heartbeat's reload is in flight): the one
    begun first reads the keys before a revocation, the second after it, and the second ends
    first. The first's older view is not taken over the second's: the revoked key stays
    refused (else it would serve again after its revocation was confirmed as applied)."""
    cache, store, key, _ = keyed(tmp_path)
    first_read = asyncio.Event()
    second_done = asyncio.Event()
    reads = 0
    plain_keys = store.keys.keys

    async def keys() -> list[KeyRecord]:
        nonlocal reads
        reads += 1
        if reads == 1:  # the first load: read now, handed back once the second is done
            seen = await plain_keys()
            first_read.set()
            await second_done.wait()
            return seen
        return await plain_keys()

    store.keys.keys = keys  # type: ignore[method-assign]

    async def work() -> None:
        first = asyncio.create_task(cache.load())
        await first_read.wait()
        # A new record, not the first load's own object changed under it.
        store.keys.records[0] = msgspec.structs.replace(store.keys.records[0], revoked_at=1)
        await cache.load()
        second_done.set()
        await first
        with pytest.raises(HubError, match="Incorrect API key"):
            await cache.authenticate(f"Bearer {key}", "127.0.0.1")

    asyncio.run(work())
