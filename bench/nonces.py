"""What durable replay refusal costs: one `store.peers.claim_nonce` (the signed request's nonce
recorded in the node's database, refused if seen) on a fresh database, pinned to one core.

    taskset -c 0 .venv/bin/python -m bench.nonces
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

from node.storage import open_store

ROUNDS = 3000


async def _measure() -> None:
    with tempfile.TemporaryDirectory() as folder:
        store = await open_store(Path(folder) / "aihub.db")
        now = int(time.time())
        for _ in range(200):  # warm the page cache and the connections
            await store.peers.claim_nonce(os.urandom(16), now + 600, now)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(ROUNDS):
            await store.peers.claim_nonce(os.urandom(16), now + 600, now)
        fresh = (time.perf_counter() - wall) / ROUNDS * 1e6
        fresh_cpu = (time.process_time() - cpu) / ROUNDS * 1e6
        pair = os.urandom(16)
        await store.peers.claim_nonce(pair, now + 600, now)
        wall = time.perf_counter()
        for _ in range(ROUNDS):
            if await store.peers.claim_nonce(pair, now + 600, now):
                raise SystemExit("a replayed nonce was accepted")
        replay = (time.perf_counter() - wall) / ROUNDS * 1e6
        await store.close()
    print(
        f"new nonce recorded: {fresh:.1f} us ({fresh_cpu:.1f} us CPU);"
        f" replay refused: {replay:.1f} us"
    )


if __name__ == "__main__":
    asyncio.run(_measure())
