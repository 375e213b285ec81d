"""What a provider's receipt costs through two checkouts' `TurnBatch`, alone in its turn (a peer's
request at concurrency 1) and eight at once, in one process on one SQLite store, alternated
round by round so that the machine's load falls on both alike: CPU µs a receipt (the whole
`Receipts._issue_batch` included), and in how many rounds the checkout's was the lower.

    git archive REV | tar -x -C /tmp/old                       # the other checkout
    taskset -c 0 .venv/bin/python -m bench.turn_batch /tmp/old
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from bench.hop import _charge, _Peering
from federation.identity import NodeIdentity
from federation.ids import new_request_id
from node.peers.batches import TurnBatch
from node.peers.receipts import Receipts, _Issue
from node.storage import open_store

ROUNDS = 40
EACH = 100  # receipts a round


def _other(checkout: Path) -> Any:
    """The other checkout's `node.peers.batches`, loaded beside ours under another name."""
    spec = importlib.util.spec_from_file_location(
        "other_batches", checkout / "node" / "peers" / "batches.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def _measure(checkout: Path, together: int) -> tuple[list[float], list[float]]:
    provider, consumer = NodeIdentity.generate(), NodeIdentity.generate()
    with tempfile.TemporaryDirectory() as folder:
        store = await open_store(Path(folder) / "provider.db")
        try:
            receipts = Receipts(provider, store, None, _Peering())  # type: ignore[arg-type]
            arms = {
                "this": TurnBatch(receipts._issue_batch, "this"),
                "other": _other(checkout).TurnBatch(receipts._issue_batch, "other"),
            }

            async def one(batch: Any) -> None:
                ids = [new_request_id() for _ in range(together)]
                items = [_Issue(_charge(i, "k"), consumer.node_id, i, "k") for i in ids]
                await asyncio.gather(*(batch.ask(item) for item in items))

            for batch in arms.values():  # warm the store and both paths
                for _ in range(200 // together):
                    await one(batch)
            cpu: dict[str, list[float]] = {name: [] for name in arms}
            for round_ in range(ROUNDS):
                for name in ("this", "other") if round_ % 2 else ("other", "this"):
                    started = time.process_time()
                    for _ in range(EACH // together):
                        await one(arms[name])
                    used = time.process_time() - started
                    cpu[name].append(used / (EACH // together * together) * 1e6)
            return cpu["this"], cpu["other"]
        finally:
            await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="the other checkout's folder")
    args = parser.parse_args()
    for together in (1, 8):
        this, other = uvloop.run(_measure(args.other, together))
        lower = sum(t < o for t, o in zip(this, other, strict=True))
        print(
            f"{together} at once: CPU us a receipt, this {statistics.median(this):.1f},"
            f" other {statistics.median(other):.1f}; this lower in {lower}/{len(this)} rounds"
        )


if __name__ == "__main__":
    main()
