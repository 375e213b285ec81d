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
        jobs = [_once_a_turn(reconcile, 3600) for _ in stores]
        try:
            for _ in range(3):  # both fire in the same turn, again and again
                await asyncio.gather(
                    *(
                        job(store, f"p{n}")
                        for n, (job, store) in enumerate(zip(jobs, stores, strict=True))
                    )
                )
            alone = _once_a_turn(reconcile, 0.000_001)  # a turn each microsecond: always new
            await alone(stores[0], "short")
            await alone(stores[1], "short")
        finally:
            for store in stores:
                await store.close()

    asyncio.run(run())
    assert len([who for who in done if who != "short"]) == 1
    assert done.count("short") == 2
