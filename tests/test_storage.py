"""The store's write paths that the request path takes, on each backend: a peer's receipt
written with its usage, never a gap or a duplicate in a chain however many processes write;
on SQLite, at once on the event loop's thread when the database is free, queued to the store's
thread when another writer holds it."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.canonical import b64url
from node.storage import open_store, sqlite_path
from node.storage.base import Store
from node.storage.records import Charge, Hold, ReceiptMaker, StoredReceipt, UsageRecord
from tests.postgres import PostgresServer, open_test_store

PAIR = ("provider-node", "consumer-node")


def body_hash(body: str) -> str:
    """A receipt's chain hash: sha-256 of its stored body (what its provider signed)."""
    return b64url(hashlib.sha256(body.encode()).digest())


def charge(request_id: str, cost: int = 7, holds: Sequence[Hold] = ()) -> Charge:
    """A finished request of key k1 that cost `cost`, settling `holds`."""
    record = UsageRecord(
        request_id=request_id,
        ts_ms=1,
        key_id="k1",
        tenant_id=None,
        model="m",
        deployment="m",
        provider="echo",
        endpoint="chat",
        stream=False,
        tokens_in=1,
        tokens_out=2,
        estimated=False,
        cost_micros=cost,
        latency_ms=1,
        status=200,
    )
    return Charge(record, list(holds))


def maker(request_id: str) -> ReceiptMaker:
    def make(seq: int, prev: str | None) -> StoredReceipt:
        # The body names the place and the link, so that a chain can be checked below.
        body = msgspec.json.encode({"seq": seq, "prev": prev}).decode()
        return StoredReceipt(*PAIR, seq, request_id, body_hash(body), 7, 1, body)

    return make


async def chain(store: Store) -> list[StoredReceipt]:
    return await store.ledger.receipts(*PAIR)


def assert_linked(receipts: list[StoredReceipt]) -> None:
    """Each receipt was made with `prev` = the hash of the one before, recomputed from its
    body (seq 1 with None)."""
    assert [r.seq for r in receipts] == list(range(1, len(receipts) + 1))
    for before, after in zip([None, *receipts], receipts, strict=False):
        prev = msgspec.json.decode(after.body)["prev"]
        assert prev == (body_hash(before.body) if before else None)


async def usage_ids(store: Store) -> set[str]:
    return {row.request_id for row in await store.usage.usage_since(0)}


def test_receipts_are_chained_and_write_no_usage(store_url: str) -> None:
    """A receipt's transaction is the chain's rows alone: the request's usage record goes by
    the journal and the usage batch (`Accounting.finish`), not a second time here."""

    async def run() -> None:
        store = await open_test_store(store_url)
        try:
            for n in range(3):
                await store.ledger.issue_receipt(PAIR, maker(f"r{n}"))
            assert_linked(await chain(store))
            assert await usage_ids(store) == set()
        finally:
            await store.close()

    asyncio.run(run())


def test_a_busy_database_queues_the_receipt_instead_of_failing(tmp_path: Path) -> None:
    """Another writer (another worker process) holds the write lock: the inline attempt gives
    way at once, the write waits on the store's thread and lands when the lock is freed."""

    async def run() -> None:
        store = await open_store(tmp_path / "db")
        other = sqlite3.connect(tmp_path / "db", isolation_level=None)
        try:
            await store.ledger.issue_receipt(PAIR, maker("first"))
            other.execute("BEGIN IMMEDIATE")
            pending = asyncio.create_task(store.ledger.issue_receipt(PAIR, maker("second")))
            await asyncio.sleep(0.3)
            assert not pending.done()  # waiting for the lock, not failed
            other.execute("COMMIT")
            receipt = await asyncio.wait_for(pending, 10)
            assert receipt.seq == 2
            assert_linked(await chain(store))
        finally:
            other.close()
            await store.close()

    asyncio.run(run())


def test_a_failing_receipt_leaves_nothing_behind(store_url: str) -> None:
    async def run() -> None:
        store = await open_test_store(store_url)
        try:

            def broken(seq: int, prev: str | None) -> StoredReceipt:
                raise ValueError("cannot sign")

            try:
                await store.ledger.issue_receipt(PAIR, broken)
            except ValueError:
                pass
            else:
                raise AssertionError("the maker's error must reach the caller")
            assert await chain(store) == []
            await store.ledger.issue_receipt(PAIR, maker("next"))
            assert [r.seq for r in await chain(store)] == [1]
        finally:
            await store.close()

    asyncio.run(run())


@settings(max_examples=15, deadline=None)
@given(per_worker=st.lists(st.integers(1, 15), min_size=2, max_size=3))
def test_several_workers_never_fork_a_chain_on_sqlite(
    tmp_path_factory, per_worker: list[int]
) -> None:
    """Workers (a thread, a loop and a store each, as worker processes have) issuing receipts
    for one pair at once: one chain, every seq once, every link right."""
    workers_never_fork_a_chain(str(tmp_path_factory.mktemp("workers") / "db"), per_worker)


@settings(max_examples=5, deadline=None)
@given(per_worker=st.lists(st.integers(1, 15), min_size=2, max_size=3))
def test_several_workers_never_fork_a_chain_on_postgres(
    postgres: PostgresServer, per_worker: list[int]
) -> None:
    """The same on PostgreSQL: each worker a pool of its own, the chain head locked in the
    database."""
    name = postgres.create_database()
    try:
        workers_never_fork_a_chain(postgres.url(name), per_worker, postgres.password)
    finally:
        postgres.drop_database(name)


def workers_never_fork_a_chain(
    url: str, per_worker: list[int], password: str | None = None
) -> None:
    async def migrate() -> None:
        await (await open_store(url, password=password)).close()

    asyncio.run(migrate())  # once, before the workers start
    ids = [[f"w{w}-{n}" for n in range(count)] for w, count in enumerate(per_worker)]

    async def worker(mine: list[str]) -> None:
        store = await open_store(url, password=password)
        try:
            await asyncio.gather(*(store.ledger.issue_receipt(PAIR, maker(r)) for r in mine))
        finally:
            await store.close()

    threads = [threading.Thread(target=asyncio.run, args=(worker(mine),)) for mine in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    async def check() -> None:
        store = await open_store(url, password=password)
        try:
            receipts = await chain(store)
            assert len(receipts) == sum(per_worker)
            assert_linked(receipts)
        finally:
            await store.close()

    asyncio.run(check())


def test_a_provider_links_to_the_hash_of_what_it_signed_not_a_stored_column(
    store_url: str, request: pytest.FixtureRequest
) -> None:
    """A damaged `hash` column (a bad restore, a hand edit) must not break the chain: the next
    receipt's `prev` is recomputed from the last receipt's body."""

    def damage() -> None:
        if store_url.startswith("sqlite"):
            with sqlite3.connect(sqlite_path(store_url)) as db:
                db.execute("DROP TRIGGER receipts_no_rewrite")
                db.execute("UPDATE receipts SET hash = 'damaged' WHERE seq = 1")
        else:
            server: PostgresServer = request.getfixturevalue("postgres")
            server.psql(
                "ALTER TABLE receipts DISABLE TRIGGER receipts_append_only;"
                " UPDATE receipts SET hash = 'damaged' WHERE seq = 1",
                store_url.rpartition("/")[2],
            )

    async def run() -> None:
        store = await open_test_store(store_url)
        try:
            await store.ledger.issue_receipt(PAIR, maker("r0"))
            damage()
            await store.ledger.issue_receipt(PAIR, maker("r1"))
            assert_linked(await chain(store))
        finally:
            await store.close()

    asyncio.run(run())
