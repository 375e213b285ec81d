"""The store's scheduled and everyday statements on a node that has run for a long time: a
SQLite store filled with `--rows` receipts, usage records, spend rows (a hundred periods of
each of `rows / 100` scopes) and audit events, then each statement timed through the store's
own API (the median of `--repeat`, warm cache). A statement that reads a growing table whole
costs in proportion to `--rows`; one that finds its rows by index does not.

    .venv/bin/python -m bench.store_growth                    # 200,000 rows
    PYTHONPATH=/tmp/old .venv/bin/python -m bench.store_growth  # another checkout's store

(`git archive REV | tar -x -C /tmp/old` for the other checkout: this file runs its code.)
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from node.storage import open_store
from node.storage.base import Store

ME, PEER = "ed25519:" + "m" * 43, "ed25519:" + "p" * 43
DAY_MS = 86_400_000


def _fill(path: Path, rows: int, now_ms: int) -> None:
    """Rows of the shape a node writes, straight into its tables (the store's own writes
    would take minutes): a consumer's receipts, all countersigned and sent but the last 100;
    usage over 30 days from 1,000 keys; spend of `rows / 100` scopes, 100 periods each;
    audit events over 30 days; a tenth as many interaction logs of 4 KB; 100 budget holds,
    half expired."""
    with sqlite3.connect(path) as db:
        db.executemany(
            "INSERT INTO receipts (provider, consumer, seq, id, hash, amount, iat, body, csig,"
            " csig_sent) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                (
                    PEER,
                    ME,
                    n,
                    f"req-{n}",
                    f"h{n}",
                    7,
                    now_ms // 1000,
                    "{}",
                    "c",
                    int(n <= rows - 100),
                )
                for n in range(1, rows + 1)
            ),
        )
        db.executemany(
            "INSERT INTO usage (request_id, ts_ms, key_id, tenant_id, model, endpoint, stream,"
            " tokens_in, tokens_out, estimated, cost_micros, latency_ms, status)"
            " VALUES (?, ?, ?, NULL, 'm', 'chat', 0, 1, 2, 0, 7, 1, 200)",
            ((f"u-{n}", now_ms - n * (30 * DAY_MS // rows), f"k{n % 1000}") for n in range(rows)),
        )
        db.executemany(
            "INSERT INTO spend (scope, period_start, cap, spent, reserved)"
            " VALUES (?, ?, 1000000000, 7, 0)",
            ((f"key:k{n // 100}", n % 100) for n in range(rows)),
        )
        db.executemany(
            "INSERT INTO audit (ts_ms, action, actor, target, detail)"
            " VALUES (?, ?, 'admin', 't', '{}')",
            ((now_ms - n * (30 * DAY_MS // rows), "auth.unknown_key") for n in range(rows)),
        )
        body = b"x" * 2000  # a request's body and its answer's, 4 KB a log
        db.executemany(
            "INSERT INTO interaction_logs (request_id, ts_ms, model, endpoint, stream, status,"
            " tokens_in, tokens_out, cost_micros, latency_ms, cache_hit, request, response,"
            " findings, truncated, size) VALUES (?, ?, 'm', 'chat', 0, 200, 1, 2, 7, 1, 0, ?,"
            " ?, '[]', 0, 4002)",
            ((f"l-{n}", now_ms - n * 1000, body, body) for n in range(rows // 10)),
        )
        db.executemany(
            "INSERT INTO budget_holds VALUES (?, ?, 'gone', 5, ?)",
            ((f"key:k{n}", 0, now_ms // 1000 + (-60 if n % 2 else 60)) for n in range(100)),
        )


async def _timed(call: Callable[[], Awaitable[object]], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        await call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def _unsent(store: Store) -> Callable[[], Awaitable[object]]:
    """The consumer's look-up of what is still to send (its signature changed: per provider)."""
    method = store.ledger.unsent_countersignatures
    if len(inspect.signature(method).parameters) == 3:
        return lambda: method(ME, PEER, 500)
    return lambda: method(ME, 500)  # type: ignore[call-arg]


async def _measure(rows: int, repeat: int) -> dict[str, float]:
    now_ms = int(time.time() * 1000)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "aihub.db"
        store = await open_store(path)
        await store.close()
        _fill(path, rows, now_ms)
        store = await open_store(path)
        try:
            scopes = [(f"key:k{n}", 5) for n in range(2)]
            calls: dict[str, Callable[[], Awaitable[object]]] = {
                "countersignatures still to send (every 2 s)": _unsent(store),
                "spend of two scopes (each usage batch, the budget alerts)": lambda: (
                    store.spend.spend(scopes)
                ),
                "the scheduled prune (expired holds given back)": lambda: store.prune(
                    now_ms // 1000
                ),
                "audit page: last 7 days, one action": lambda: store.audit.audit(
                    now_ms - 7 * DAY_MS, 500, "key.*"
                ),
                "usage report by key, last 24 h": lambda: store.usage.usage_report(
                    "key", now_ms - DAY_MS
                ),
                # All of them fit: nothing deleted, every size read.
                "interaction logs' prune (hourly), a tenth as many logs, 4 KB each": lambda: (
                    store.logs.prune_logs(0, 10**12)
                ),
            }
            return {name: await _timed(call, repeat) for name, call in calls.items()}
        finally:
            await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    figures = asyncio.run(_measure(args.rows, args.repeat))
    where = Path(sys.modules["node"].__file__ or "").parent.parent
    print(f"the store's statements at {args.rows:,} rows, code at {where} (ms, median):")
    for name, value in figures.items():
        print(f"  {value:9.3f}  {name}")


if __name__ == "__main__":
    main()
