"""A provider's receipts asked for together (peers' answers that came in at once) are written
in one transaction, on each backend: the chain stays whole and linked, every request gets its
own receipt, one bad request costs no other its receipt, and a request that went away still
has its receipt written."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from federation.identity import NodeIdentity
from ledger.chain import verify_chain
from ledger.receipts import parse_receipt, public_key_of
from node.peers.receipts import Receipts, loaded
from node.storage.base import Store
from node.storage.postgres.connection import lock_key
from tests.postgres import open_test_store
from tests.test_storage import charge

PROVIDER, CONSUMER, OTHER = (NodeIdentity.generate() for _ in range(3))


class _Peering:
    """What `Receipts` reads of the peering when it issues: the advert seq it prices under."""

    advert_seq = 1
    peers: dict[str, Any] = {}


def counting(store: Store) -> list[int]:
    """The size of each transaction the store's ledger is asked to issue receipts in."""
    sizes: list[int] = []
    write = store.ledger.issue_receipts

    async def counted(issued):  # type: ignore[no-untyped-def]
        sizes.append(len(issued))
        return await write(issued)

    store.ledger.issue_receipts = counted  # type: ignore[method-assign]
    return sizes


async def issued_ids(store: Store) -> set[str]:
    """The request ids our receipts (to either consumer) are for."""
    rows = [
        row
        for consumer in (CONSUMER, OTHER)
        for row in await store.ledger.receipts(PROVIDER.node_id, consumer.node_id)
    ]
    return {row.id for row in rows}


async def whole(store: Store, consumer: NodeIdentity, count: int) -> None:
    rows = await store.ledger.receipts(PROVIDER.node_id, consumer.node_id)
    receipts = [loaded(row) for row in rows]
    report = verify_chain(receipts, public_key_of(PROVIDER.node_id))
    assert report.ok, report
    assert len(receipts) == count


async def test_receipts_asked_for_together_share_one_transaction(store_url: str) -> None:
    store = await open_test_store(store_url)
    sizes = counting(store)
    receipts = Receipts(PROVIDER, store, None, _Peering())  # type: ignore[arg-type]
    try:
        ids = [f"req-{n}" for n in range(20)]
        consumers = [CONSUMER if n % 3 else OTHER for n in range(20)]  # two chains at once
        bodies = await asyncio.gather(
            *(
                receipts.issue(charge(i), who.node_id, i, "k1")
                for i, who in zip(ids, consumers, strict=True)
            )
        )
        # Each request has its own receipt, for its consumer; fewer commits than receipts.
        assert [parse_receipt(b).id for b in bodies] == ids
        assert [parse_receipt(b).consumer for b in bodies] == [c.node_id for c in consumers]
        assert sum(sizes) == 20 and len(sizes) < 20
        await whole(store, CONSUMER, consumers.count(CONSUMER))
        await whole(store, OTHER, consumers.count(OTHER))
        assert await issued_ids(store) == set(ids)
        # And then one alone, linked to the batch's last.
        await receipts.issue(charge("after"), CONSUMER.node_id, "after", "k1")
        await whole(store, CONSUMER, consumers.count(CONSUMER) + 1)
    finally:
        await receipts.settle_tasks()
        await store.close()


async def test_one_bad_request_costs_no_other_its_receipt(store_url: str) -> None:
    """A receipt that cannot be signed (a key id over the bound a receiver enforces) fails its
    own request only: the batch it was in is written again without it."""
    store = await open_test_store(store_url)
    receipts = Receipts(PROVIDER, store, None, _Peering())  # type: ignore[arg-type]
    try:
        keys = ["k1", "k" * 300, "k1", "k1"]
        results = await asyncio.gather(
            *(
                receipts.issue(charge(f"r{n}"), CONSUMER.node_id, f"r{n}", key)
                for n, key in enumerate(keys)
            ),
            return_exceptions=True,
        )
        assert isinstance(results[1], ValueError)
        assert [parse_receipt(results[n]).id for n in (0, 2, 3)] == ["r0", "r2", "r3"]
        await whole(store, CONSUMER, 3)
        assert await issued_ids(store) == {"r0", "r2", "r3"}
    finally:
        await receipts.settle_tasks()
        await store.close()


async def test_a_request_gone_meanwhile_still_has_its_receipt(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = await open_test_store(f"sqlite://{tmp_path / 'aihub.db'}")
    receipts = Receipts(PROVIDER, store, None, _Peering())  # type: ignore[arg-type]
    try:
        gone = asyncio.ensure_future(receipts.issue(charge("gone"), CONSUMER.node_id, "gone", "k1"))
        await asyncio.sleep(0)  # it has asked; then its task is cancelled
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        await receipts.settle_tasks()
        await whole(store, CONSUMER, 1)
        assert await issued_ids(store) == {"gone"}
    finally:
        await store.close()


async def test_the_gatherer_cancelled_mid_write_costs_the_others_nothing(store_url: str) -> None:
    """The first request of a turn writes the turn's receipts. If it is cancelled while the
    transaction runs (its peer hung up on a stream, whose receipt comes at its end: a hostile
    peer can time that), the batch is still written and every other request still gets its
    own receipt, where it used to get a CancelledError and, on PostgreSQL, lose its receipt
    (then written with its usage record) with the rolled-back transaction though its answer
    was already sent."""
    store = await open_test_store(store_url)
    writing, release = asyncio.Event(), asyncio.Event()
    write = store.ledger.issue_receipts

    async def slow(issued):  # type: ignore[no-untyped-def]
        writing.set()
        await release.wait()
        return await write(issued)

    store.ledger.issue_receipts = slow  # type: ignore[method-assign]
    receipts = Receipts(PROVIDER, store, None, _Peering())  # type: ignore[arg-type]
    try:
        first = asyncio.ensure_future(receipts.issue(charge("g0"), CONSUMER.node_id, "g0", "k1"))
        others = [
            asyncio.ensure_future(receipts.issue(charge(f"g{n}"), CONSUMER.node_id, f"g{n}", "k1"))
            for n in (1, 2, 3)
        ]
        await writing.wait()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        release.set()
        bodies = await asyncio.gather(*others)
        assert [parse_receipt(b).id for b in bodies] == ["g1", "g2", "g3"]
        await receipts.settle_tasks()
        await whole(store, CONSUMER, 4)
        assert await issued_ids(store) == {"g0", "g1", "g2", "g3"}
    finally:
        release.set()
        await receipts.settle_tasks()
        await store.close()


@contextlib.asynccontextmanager
async def chain_held(store_url: str) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Another process holding what a receipt's transaction must wait for (SQLite: the
    database's write lock; PostgreSQL: the chain's lock), until the function yielded is
    called. On PostgreSQL that function returns once the write that waited for it is done; on
    SQLite that write is on the store's thread, and the store's next statement comes after
    it."""
    if store_url.startswith("sqlite://"):
        holder = sqlite3.connect(store_url.removeprefix("sqlite://"), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")

        async def release_sqlite() -> None:
            holder.execute("ROLLBACK")
            holder.close()

        try:
            yield release_sqlite
        finally:
            holder.close()
        return
    other = await open_test_store(store_url)
    key = lock_key("chain", PROVIDER.node_id, CONSUMER.node_id)
    connection = await other.ledger._db._pool.acquire()  # type: ignore[attr-defined]
    holding = connection.transaction()
    await holding.start()
    await connection.execute("SELECT pg_advisory_xact_lock($1)", key)

    async def release_postgres() -> None:
        await holding.commit()
        # Lock waits are granted in order: ours again comes after the writer's commit.
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", key)

    try:
        yield release_postgres
    finally:
        await other.ledger._db._pool.release(connection)  # type: ignore[attr-defined]
        await other.close()


async def test_a_request_alone_gone_mid_write_still_has_its_receipt(store_url: str) -> None:
    """A receipt alone in its turn is written by its requester itself, not by a task: if the
    requester is cancelled while the store writes it (waiting for another process's lock),
    the write still runs to its end."""
    store = await open_test_store(store_url)
    writing = asyncio.Event()
    write = store.ledger.issue_receipts

    async def seen(issued):  # type: ignore[no-untyped-def]
        writing.set()
        return await write(issued)

    store.ledger.issue_receipts = seen  # type: ignore[method-assign]
    receipts = Receipts(PROVIDER, store, None, _Peering())  # type: ignore[arg-type]
    try:
        await receipts.issue(charge("before"), CONSUMER.node_id, "before", "k1")
        writing.clear()
        async with chain_held(store_url) as release:
            gone = asyncio.ensure_future(
                receipts.issue(charge("gone"), CONSUMER.node_id, "gone", "k1")
            )
            await writing.wait()  # in the store's write, which waits for the lock
            gone.cancel()
            with pytest.raises(asyncio.CancelledError):
                await gone
            await release()
        await receipts.settle_tasks()
        await whole(store, CONSUMER, 2)
        assert await issued_ids(store) == {"before", "gone"}
    finally:
        await receipts.settle_tasks()
        await store.close()
