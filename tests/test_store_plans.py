"""The statements the node runs on a schedule, on every usage batch or reservation, and for
the admin's everyday pages find their rows by an index: none reads the whole of a table that
grows for as long as the node runs (every receipt, every request's usage, every scope's spend
in every period, every audit event). Each was a full read before: the countersignatures still
to send (every 2 seconds), the spend of a usage batch's scopes, the expired budget holds'
give-back (every 30 seconds, in a write transaction), the audit page, the usage report by key.

The statements are the SQLite store's own, caught as it runs them (with their values), then
planned by SQLite (`EXPLAIN QUERY PLAN`) on the same file; no statistics are gathered (the
node never runs ANALYZE), as on a node."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from node.storage import open_store
from node.storage.records import AuditEvent, Charge, Hold, InteractionLog
from node.storage.sqlite.store import SqliteStore
from tests.test_storage import charge

GROWING = ("receipts", "spend", "usage", "audit", "budget_holds", "interaction_logs")
SCOPES = [("key:k1", 0), ("tenant:t1", 0)]


async def _caught(store: SqliteStore, call: Callable[[], Awaitable[object]]) -> list[str]:
    """The statements `call` ran on the store's connections (the store's thread's and the
    event loop's own), as SQLite ran them."""
    ran: list[str] = []
    db = store.db
    await db.atomic(lambda connection: connection.set_trace_callback(ran.append), write=False)
    db._inline_connection().set_trace_callback(ran.append)
    try:
        await call()
    finally:
        await db.atomic(lambda connection: connection.set_trace_callback(None), write=False)
        db._inline_connection().set_trace_callback(None)
    return [sql for sql in ran if re.match(r"\s*(SELECT|UPDATE|DELETE|WITH)\b", sql, re.I)]


def _whole_reads(path: Path, sql: str) -> list[str]:
    """The steps of `sql`'s plan that read a growing table whole (by its rows or an index)."""
    names = dict.fromkeys(GROWING)
    for _table, alias in re.findall(rf"\b({'|'.join(GROWING)})\s+(?:AS\s+)?(\w+)", sql, re.I):
        if alias.upper() not in ("WHERE", "SET", "JOIN", "ON", "ORDER", "GROUP", "LIMIT"):
            names[alias] = None
    with sqlite3.connect(path) as db:
        plan = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}")]
    return [step for step in plan if re.match(rf"SCAN ({'|'.join(names)})\b", step)]


@pytest.fixture
async def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    opened = await open_store(tmp_path / "aihub.db")
    assert isinstance(opened, SqliteStore)
    try:
        yield opened
    finally:
        await opened.close()


def _spent(request_id: str) -> Charge:
    """A request charged to a key and its tenant: a usage batch settling two scopes."""
    return charge(request_id, 5, [Hold(scope, start, 5, "worker-1") for scope, start in SCOPES])


def _log(request_id: str, ts_ms: int) -> InteractionLog:
    """A logged request of 20 bytes (its bodies and findings)."""
    return InteractionLog(
        request_id, ts_ms, "k1", None, "m", "chat", None, None, False, 200, 1, 2, 3, 4, False,
        None, b'{"q":"1234"}', b"{}", b"[]",
    )  # fmt: skip


CALLS: dict[str, Callable[[SqliteStore], Awaitable[object]]] = {
    "countersignatures still to send": lambda s: s.ledger.unsent_countersignatures(
        "ed25519:me", "ed25519:them", 500
    ),
    "a usage batch and its scopes' spend": lambda s: s.usage.write_batch(
        [_spent("r1"), _spent("r2")], [AuditEvent(1, "key.create", "admin", "k1", None, {})]
    ),
    "a reservation in two scopes": lambda s: s.spend.reserve(3, SCOPES, "worker-1"),
    "the scheduled prune (expired holds given back)": lambda s: s.prune(int(time.time()) + 3600),
    "the audit page": lambda s: s.audit.audit(0, 100, "key.*"),
    "the usage report by key": lambda s: s.usage.usage_report("key", 0),
}


@pytest.mark.parametrize("name", list(CALLS))
async def test_no_growing_table_is_read_whole(store: SqliteStore, name: str) -> None:
    await store.spend.open_periods([(scope, start, 1_000) for scope, start in SCOPES])
    ran = await _caught(store, lambda: CALLS[name](store))
    assert ran, "the call ran no statement that reads"
    for sql in ran:
        assert _whole_reads(store.db.path, sql) == [], sql


async def test_the_countersignatures_to_send_are_found_in_their_own_index(
    store: SqliteStore,
) -> None:
    """Not by the pair's whole chain either: a provider's receipts to one consumer are all
    that pair's, and only those not yet sent are in the index."""
    (sql,) = await _caught(store, lambda: CALLS["countersignatures still to send"](store))
    with sqlite3.connect(store.db.path) as db:
        plan = " ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}"))
    assert "receipts_unsent" in plan and "TEMP B-TREE" not in plan, plan


async def test_the_logs_prune_reads_their_sizes_not_their_bodies(store: SqliteStore) -> None:
    """Keeping the interaction logs under `max_bytes` sums their sizes, newest first: from
    an index that holds them, not from the rows, which hold every request's bodies (it read
    them all, in the write transaction, hourly); the deletes then go by that index."""
    for n in range(3):  # one over the bound: the cutoff's delete runs too
        await store.logs.insert_log(_log(f"r{n}", 1000 + n))
    ran = await _caught(store, lambda: store.logs.prune_logs(0, 40))
    assert len(ran) == 3, ran  # the cutoff read, the old logs' delete, the cutoff's
    with sqlite3.connect(store.db.path) as db:
        plans = [[row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}")] for sql in ran]
    reads = [step for plan in plans for step in plan if "interaction_logs" in step]
    assert reads, plans
    assert all("COVERING INDEX" in step or step.startswith("SEARCH") for step in reads), plans
