"""What durable replay refusal costs: one `store.peers.claim_nonce` (the signed request's nonce
recorded in the node's database, refused if seen) on a fresh database, pinned to one core, on
uvloop (the node's loop); and the claims of requests that come in together: each in its own
transaction, through `NonceClaims` (on SQLite with the database free, each written at once),
and in one transaction (`claim_nonces`, what a batch costs the store), alternated.

    taskset -c 0 .venv/bin/python -m bench.nonces
    .venv/bin/python -m bench.nonces --postgres    # a PostgreSQL server of its own (the tests')
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop

from node.peers.nonce_claims import NonceClaims
from node.storage import open_store

ROUNDS = 3000
TOGETHER = 8  # claims asked for in one turn (peers' requests that came in together)
ALTERNATIONS = 5


async def _per_claim(
    runs: int, each: int, run: Callable[[], Awaitable[object]]
) -> tuple[float, float]:
    """This process's CPU µs, and wall µs, a claim over `runs` calls of `run` (`each` claims)."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(runs):
        await run()
    claims = runs * each
    return (time.process_time() - cpu) / claims * 1e6, (time.perf_counter() - wall) / claims * 1e6


async def _measure(url: str | None, password: str | None) -> None:
    with tempfile.TemporaryDirectory() as folder:
        store = await open_store(url or Path(folder) / "aihub.db", password=password)
        batches = NonceClaims(store)
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

        def each_alone() -> Awaitable[object]:
            return asyncio.gather(
                *(store.peers.claim_nonce(os.urandom(16), now + 600, now) for _ in range(TOGETHER))
            )

        def in_one_turn() -> Awaitable[object]:
            return asyncio.gather(
                *(batches.claim(os.urandom(16), now + 600, now) for _ in range(TOGETHER))
            )

        def in_one_call() -> Awaitable[object]:
            return store.peers.claim_nonces(
                [(os.urandom(16), now + 600) for _ in range(TOGETHER)], now
            )

        def one_batched() -> Awaitable[object]:
            return batches.claim(os.urandom(16), now + 600, now)

        def one_alone() -> Awaitable[object]:
            return store.peers.claim_nonce(os.urandom(16), now + 600, now)

        figures: dict[str, list[tuple[float, float]]] = {}
        arms = {
            f"{TOGETHER} at once, each its own transaction": (each_alone, TOGETHER),
            f"{TOGETHER} at once, through NonceClaims": (in_one_turn, TOGETHER),
            f"{TOGETHER} in one transaction (claim_nonces)": (in_one_call, TOGETHER),
            "one alone, claim_nonce": (one_alone, 1),
            "one alone, through NonceClaims": (one_batched, 1),
        }
        for turn in range(ALTERNATIONS):
            order = list(arms.items()) if turn % 2 == 0 else list(arms.items())[::-1]
            for name, (run, each) in order:
                runs = ROUNDS // 4 // each  # the same number of claims in every arm
                figures.setdefault(name, []).append(await _per_claim(runs, each, run))
        await batches.settle()
        await store.close()
    print(
        f"new nonce recorded: {fresh:.1f} us ({fresh_cpu:.1f} us CPU);"
        f" replay refused: {replay:.1f} us"
    )
    for name, values in figures.items():
        cpu = statistics.median(v[0] for v in values)
        wall = statistics.median(v[1] for v in values)
        print(f"{name}: {cpu:.1f} us CPU, {wall:.1f} us wall a claim (medians of {len(values)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", action="store_true", help="on a PostgreSQL server")
    if not parser.parse_args().postgres:
        uvloop.run(_measure(None, None))  # the loop the node serves on
        return
    from tests.postgres import postgres_server

    with postgres_server() as server:
        database = server.create_database()
        uvloop.run(_measure(server.url(database), server.password))


if __name__ == "__main__":
    main()
