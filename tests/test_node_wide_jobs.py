"""Node-wide jobs (node/hub.py `_once_a_turn`): every process of the node schedules them,
one does each turn. Reconciling with every peer ran once per worker: each peer was asked as
many times, and every refusal logged again."""

from __future__ import annotations

import asyncio
from pathlib import Path

from node.hub import _once_a_turn
from node.storage import open_store


def test_each_turn_is_done_by_one_process_of_many(tmp_path: Path) -> None:
    done: list[str] = []

    async def reconcile(who: str) -> None:
        done.append(who)

    async def run() -> None:
        # Two processes of one node: each its own store connection and its own wrapped job.
        stores = [await open_store(tmp_path / "aihub.db") for _ in range(2)]
        jobs = [_once_a_turn(store, reconcile, 3600) for store in stores]
        try:
            for _ in range(3):  # both fire in the same turn, again and again
                await asyncio.gather(*(job(f"p{n}") for n, job in enumerate(jobs)))
            for store in stores:  # a turn each microsecond: always a new one
                await _once_a_turn(store, reconcile, 0.000_001)("short")
        finally:
            for store in stores:
                await store.close()

    asyncio.run(run())
    assert len([who for who in done if who != "short"]) == 1
    assert done.count("short") == 2
