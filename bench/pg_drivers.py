"""Which PostgreSQL driver for the store: asyncpg or psycopg 3, timed on the request path's
statements against a real server (started here, as the test suite does).

One request's books, as the store runs them: the reservation (one UPDATE over the scopes, all
or none), then the settlement (one transaction: the usage record, the spend it settles). Timed
one request at a time (the latency each adds) and 32 at a time (what a pool sustains), through
each driver's own pool.

    python -m bench.pg_drivers [--requests N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable

import asyncpg
import psycopg
import psycopg_pool

from tests.postgres import postgres_server

SCHEMA = """
CREATE TABLE spend (scope TEXT, period_start BIGINT, cap BIGINT, spent BIGINT DEFAULT 0,
    reserved BIGINT DEFAULT 0, PRIMARY KEY (scope, period_start));
CREATE TABLE usage (request_id TEXT PRIMARY KEY, ts_ms BIGINT, key_id TEXT, model TEXT,
    tokens_in BIGINT, tokens_out BIGINT, cost_micros BIGINT, status INTEGER);
INSERT INTO spend VALUES ('key:k1', 0, 9000000000000000, 0, 0), ('tenant:t1', 0,
    9000000000000000, 0, 0);
"""

# The store's reservation: the scopes' rows locked in one order (no deadlock between two
# reservations), then all reserved or none.
RESERVE = (
    "WITH held AS (SELECT scope, period_start, cap, spent, reserved FROM spend"
    " WHERE (scope, period_start) IN (SELECT * FROM unnest($2::text[], $3::bigint[]))"
    " ORDER BY scope, period_start FOR UPDATE)"
    " UPDATE spend SET reserved = spend.reserved + $1 FROM held"
    " WHERE spend.scope = held.scope AND spend.period_start = held.period_start"
    " AND NOT EXISTS (SELECT 1 FROM held WHERE held.spent::numeric + held.reserved + $1 > held.cap)"
)
INSERT_USAGE = (
    "INSERT INTO usage VALUES ($1, $2, 'k1', 'echo', 10, 20, $3, 200) ON CONFLICT DO NOTHING"
)
SETTLE = (
    "UPDATE spend SET reserved = GREATEST(reserved - $1, 0), spent = spent + $2"
    " WHERE scope = $3 AND period_start = $4"
)
SCOPES = (["key:k1", "tenant:t1"], [0, 0])


def _psycopg(sql: str) -> str:
    """The same statement with psycopg's placeholders (it numbers none: %s each time)."""
    for n in range(9, 0, -1):
        sql = sql.replace(f"${n}", f"%(p{n})s")
    return sql


def _named(*values: object) -> dict[str, object]:
    return {f"p{n}": value for n, value in enumerate(values, start=1)}


async def asyncpg_request(pool: asyncpg.Pool, n: int) -> None:
    async with pool.acquire() as db:
        status = await db.execute(RESERVE, 100, *SCOPES)
        assert status == "UPDATE 2", status
    async with pool.acquire() as db, db.transaction():
        await db.execute(INSERT_USAGE, f"r{n}-{time.monotonic_ns()}", n, 50)
        await db.executemany(SETTLE, [(100, 50, "key:k1", 0), (100, 50, "tenant:t1", 0)])


async def psycopg_request(pool: psycopg_pool.AsyncConnectionPool, n: int) -> None:
    async with pool.connection() as db:
        cursor = await db.execute(_psycopg(RESERVE), _named(100, *SCOPES))
        assert cursor.rowcount == 2, cursor.rowcount
    async with pool.connection() as db, db.transaction():
        await db.execute(_psycopg(INSERT_USAGE), _named(f"r{n}-{time.monotonic_ns()}", n, 50))
        async with db.cursor() as cursor:
            await cursor.executemany(
                _psycopg(SETTLE), [_named(100, 50, "key:k1", 0), _named(100, 50, "tenant:t1", 0)]
            )


async def timed(
    request: Callable[[int], Awaitable[None]], requests: int, concurrency: int
) -> tuple[float, float]:
    """(p50 of one request in ms, requests per second) at this concurrency."""
    times: list[float] = []
    counter = iter(range(requests))

    async def worker() -> None:
        for n in counter:
            start = time.perf_counter()
            await request(n)
            times.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return statistics.median(times) * 1000, requests / elapsed


async def run(url: str, password: str, requests: int) -> None:
    setup = await asyncpg.connect(url, password=password)
    await setup.execute(SCHEMA)
    await setup.close()
    apool = await asyncpg.create_pool(url, password=password, min_size=32, max_size=32)
    conninfo = psycopg.conninfo.make_conninfo(url, password=password)
    ppool = psycopg_pool.AsyncConnectionPool(
        conninfo, min_size=32, max_size=32, open=False, kwargs={"autocommit": True}
    )
    await ppool.open(wait=True)
    arms = {
        "asyncpg": lambda n: asyncpg_request(apool, n),
        "psycopg": lambda n: psycopg_request(ppool, n),
    }
    for concurrency in (1, 32):
        for name, request in arms.items():
            await timed(request, requests // 10, concurrency)  # warm up
            p50, rate = await timed(request, requests, concurrency)
            print(f"{name:8} concurrency {concurrency:2}: p50 {p50:.3f} ms, {rate:,.0f} req/s")
    await apool.close()
    await ppool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    args = parser.parse_args()
    with postgres_server() as server:
        os.environ.setdefault("PGAPPNAME", "aihub-bench")
        asyncio.run(run(server.url(), server.password, args.requests))


if __name__ == "__main__":
    main()
