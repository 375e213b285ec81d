"""Settlements written with their receipts (a peer's requests) reach the usage listeners (the
budget alerts) in batches, as the batch writer's do, and none is lost at shutdown."""

from __future__ import annotations

import asyncio
from pathlib import Path

from node.gateway.usage import UsageRecorder
from node.storage import open_store
from node.storage.records import Charge, SpendRow
from tests.test_storage import charge


async def test_written_settlements_reach_the_listeners_together(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "db")
    recorder = UsageRecorder(store, flush_interval=0.01)
    heard: list[list[str]] = []
    all_heard, later_heard = asyncio.Event(), asyncio.Event()

    async def listener(charges: list[Charge], _spend: list[SpendRow] | None) -> None:
        heard.append([c.record.request_id for c in charges])
        if sum(map(len, heard)) == 50:
            all_heard.set()
        if heard[-1] == ["later"]:
            later_heard.set()

    recorder.listeners.append(listener)
    try:
        for n in range(50):  # fifty peer requests settled in the same few milliseconds
            recorder.written([charge(f"r{n}")])
        await asyncio.wait_for(all_heard.wait(), 10)
        assert sorted(i for batch in heard for i in batch) == sorted(f"r{n}" for n in range(50))
        assert len(heard) < 50  # together: not one listener call (one spend read) each
        recorder.written([charge("later")])  # after a batch went: a new one follows
        await asyncio.wait_for(later_heard.wait(), 10)
    finally:
        await recorder.stop()
        await store.close()


async def test_stop_delivers_what_was_written_last(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "db")
    recorder = UsageRecorder(store, flush_interval=5)
    heard: list[str] = []

    async def listener(charges: list[Charge], _spend: list[SpendRow] | None) -> None:
        heard.extend(c.record.request_id for c in charges)

    recorder.listeners.append(listener)
    recorder.written([charge("last")])
    await recorder.stop()
    await store.close()
    assert heard == ["last"]


async def test_records_that_come_in_while_a_batch_is_written_wait_for_their_own(
    tmp_path: Path,
) -> None:
    """A busy node writes a batch per `flush_interval` (or per full batch), not one per
    write's duration: what comes in while a batch is being written is not written on at
    once, alone, but with what follows it."""
    store = await open_store(tmp_path / "db")
    recorder = UsageRecorder(store, flush_interval=3600, batch=2)
    heard: list[list[str]] = []
    entered, gate, done = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def listener(charges: list[Charge], _spend: list[SpendRow] | None) -> None:
        heard.append([c.record.request_id for c in charges])
        if len(heard) == 1:  # the first batch, held until the test has queued one more
            entered.set()
            await gate.wait()
            done.set()

    recorder.listeners.append(listener)
    recorder.start()
    try:
        recorder.record(charge("a"))
        recorder.record(charge("b"))  # a full batch: written at once
        await asyncio.wait_for(entered.wait(), 10)
        recorder.record(charge("c"))  # while [a, b] is being written
        gate.set()
        await asyncio.wait_for(done.wait(), 10)
        recorder.record(charge("d"))
        await recorder.flush()
        assert heard == [["a", "b"], ["c", "d"]]
    finally:
        await recorder.stop()
        await store.close()
