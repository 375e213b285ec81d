"""A key's budget and rate-limit scopes, worked out once per key and kept until the keys
reload: not formatted (`key:<id>`, `tenant:<id>`) and built into lists on every request, and
never kept past a change to the key or its tenant."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

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
