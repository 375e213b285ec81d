"""What serialising a receipt chain's head costs on PostgreSQL: `issue_receipt` (the next
receipt of the pair's chain, in one transaction; its usage record goes by the journal) timed
one at a time with the pair's advisory lock and without it, against a real server started as
the test suite starts one. Without the lock two processes could both read the same head; the
primary key would then refuse the second receipt, so the lock turns a failed request into a
short wait. Sequential calls only: that is where its own cost shows.

    python -m bench.pg_chain [--requests N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import msgspec

from node.storage import open_store
from node.storage.postgres import ledger
from node.storage.records import StoredReceipt, body_hash
from tests.postgres import postgres_server


def make(pair: tuple[str, str], request_id: str):  # type: ignore[no-untyped-def]
    def receipt(seq: int, prev: str | None) -> StoredReceipt:
        body = msgspec.json.encode({"seq": seq, "prev": prev, "id": request_id}).decode()
        return StoredReceipt(*pair, seq, request_id, body_hash(body), 7, 1, body)

    return receipt


async def timed(url: str, password: str, requests: int, pair: tuple[str, str]) -> float:
    store = await open_store(url, password=password)
    try:
        times = []
        for n in range(requests):
            request_id = f"{pair[1]}-{n}"
            start = time.perf_counter()
            await store.ledger.issue_receipt(pair, make(pair, request_id))
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000
    finally:
        await store.close()


async def run(url: str, password: str, requests: int) -> None:
    locked = ledger.lock_chains

    async def unlocked(db: object, pairs: object) -> None:
        return None

    results: dict[str, list[float]] = {"with the lock": [], "without": []}
    for round_ in range(3):
        for name in results:
            ledger.lock_chains = locked if name == "with the lock" else unlocked  # type: ignore[assignment]
            pair = ("provider", f"consumer-{name[:4]}-{round_}")
            results[name].append(await timed(url, password, requests, pair))
    ledger.lock_chains = locked
    for name, p50s in results.items():
        print(f"issue_receipt {name:13}: p50 {statistics.median(p50s):.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    with postgres_server() as server:
        asyncio.run(run(server.url(), server.password, args.requests))


if __name__ == "__main__":
    main()
