"""Settlements written with their receipts (a peer's requests) reach the usage listeners (the
budget alerts) in batches, as the batch writer's do, and none is lost at shutdown."""

from __future__ import annotations

import asyncio
from pathlib import Path

from node.gateway.usage import UsageRecorder
from node.storage import open_store
from node.storage.records import Charge
from tests.test_storage import charge


async def test_written_settlements_reach_the_listeners_together(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "db")
    recorder = UsageRecorder(store, flush_interval=0.01)
    heard: list[list[str]] = []
    all_heard, later_heard = asyncio.Event(), asyncio.Event()

    async def listener(charges: list[Charge]) -> None:
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

    async def listener(charges: list[Charge]) -> None:
        heard.extend(c.record.request_id for c in charges)

    recorder.listeners.append(listener)
    recorder.written([charge("last")])
    await recorder.stop()
    await store.close()
    assert heard == ["last"]
