"""The connection pool of a PostgreSQL store, and the one way to run work on it:
`await db.atomic(work)`, where `work(connection)` runs whole, in a transaction.

asyncpg (chosen over psycopg 3 by `bench/pg_drivers.py`: docs/storage.md has the numbers)
prepares each statement once per connection and keeps it, so the request path's statements
cost one round trip each. Transactions are READ COMMITTED; what must be decided across
processes takes a row lock (`SELECT … FOR UPDATE`) or an advisory lock on what it decides (a
chain head, a rate-limit scope), always in one order, so that two transactions never wait on
each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import asyncpg

from node.storage.migrations import MIGRATIONS
from node.storage.records import Refused, StoreUnavailable

T = TypeVar("T")
Work = Callable[[asyncpg.Connection], Awaitable[T]]

# One number for the migrations' lock: two processes starting at once apply them once.
_MIGRATION_LOCK = 0x61696875620001


def lock_key(*parts: str) -> int:
    """The advisory lock (a signed 64-bit number) that stands for what `parts` name."""
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def changed(status: str) -> int:
    """The rows a statement changed, from its status ("UPDATE 2", "INSERT 0 1")."""
    count = status.rpartition(" ")[2]
    return int(count) if count.isdigit() else 0


async def migrate(db: asyncpg.Connection) -> list[int]:
    """Apply the migrations not yet applied, each in its own transaction; their numbers."""
    applied: list[int] = []
    async with db.transaction():
        await db.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await db.execute("CREATE TABLE IF NOT EXISTS aihub_schema (version BIGINT NOT NULL)")
        version = await db.fetchval("SELECT version FROM aihub_schema")
        if version is None:
            await db.execute("INSERT INTO aihub_schema VALUES (0)")
            version = 0
        for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
            await db.execute(migration.postgres)
            await db.execute("UPDATE aihub_schema SET version = $1", number)
            applied.append(number)
    return applied


async def schema_version(db: asyncpg.Connection) -> int:
    exists = await db.fetchval("SELECT to_regclass('aihub_schema') IS NOT NULL")
    return int(await db.fetchval("SELECT version FROM aihub_schema")) if exists else 0


async def database_id(db: asyncpg.Connection) -> str:
    """Which database this is: the cluster's system identifier and the database's oid. A
    dump restored (into another database, or another cluster) has another."""
    row = await db.fetchrow(
        "SELECT (SELECT system_identifier FROM pg_control_system()),"
        " (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    assert row is not None
    return f"pg:{row[0]}:{row[1]}"


# The server cannot be reached, went away, or is shutting down or starting: try again later.
UNREACHABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    asyncpg.exceptions.InvalidPasswordError,
    asyncpg.exceptions.InvalidCatalogNameError,
)
# A record the database refuses as it is.
REFUSED = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """The driver's errors as the store's own (`records.StoreUnavailable`, `Refused`)."""
    try:
        yield
    except asyncpg.UniqueViolationError:
        raise  # a Conflict where the caller knows what is unique (keys.py)
    except REFUSED as exc:
        raise Refused(str(exc)) from exc
    except UNREACHABLE as exc:
        raise StoreUnavailable(f"the database cannot be reached: {exc}") from exc


async def _keep_session(db: asyncpg.Connection) -> None:
    """What a connection needs before it goes back to the pool: nothing beyond the rollback of
    a transaction left open, which asyncpg does before it calls this. The default reset (`CLOSE
    ALL; UNLISTEN *; RESET ALL; SELECT pg_advisory_unlock_all()`) would be a round trip, four
    statements parsed and planned, on every use of a connection: an eighth of every request's
    statements in the bench. The store leaves nothing for it to reset: it sets no session
    settings, takes only transaction-scoped advisory locks (`pg_advisory_xact_lock`), opens
    cursors only inside transactions, and listens on a connection of its own (`changes.py`)."""


class Database:
    """A pool of connections to one PostgreSQL database, shared by every coroutine of the
    process (other processes have pools of their own)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def open(
        cls, url: str, password: str | None, *, pool_size: int = 10, migrate_now: bool = True
    ) -> Database:
        """Connect and (unless `migrate_now` is False) bring the schema up to date first."""
        pool = await asyncpg.create_pool(
            url,
            password=password,
            # None kept open when idle: a pool that must keep one reconnects in the background
            # while the server is away, logging each failure; ours reconnect on use.
            min_size=0,
            max_size=pool_size,
            command_timeout=60,
            reset=_keep_session,
            # The node's own name in pg_stat_activity, for whoever runs the database.
            server_settings={"application_name": "aihub"},
        )
        try:
            if migrate_now:
                async with pool.acquire() as db:
                    await migrate(db)
        except BaseException:
            await pool.close()
            raise
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    async def migrate(self) -> tuple[int, list[int]]:
        """(the schema version found, the migrations applied now)."""
        async with self._pool.acquire() as db:
            found = await schema_version(db)
            return found, await migrate(db)

    async def atomic(self, work: Work[T]) -> T:
        """Run `work` whole, in one transaction on one connection of the pool: all of its
        statements, or none if it raises (its exception reaches the caller). A caller
        cancelled meanwhile leaves the work to finish (or roll back) on its own, as the
        SQLite store does: a request whose client went away still has its books written."""
        return await asyncio.shield(self._atomic(work))

    async def _atomic(self, work: Work[T]) -> T:
        with _translated():
            async with self._pool.acquire() as db, db.transaction():
                return await work(db)

    async def _one(self, call: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """One statement, on its own (autocommit): no BEGIN and COMMIT round trips."""

        async def run() -> T:
            with _translated():
                async with self._pool.acquire() as db:
                    return await call(db)

        return await asyncio.shield(run())

    # Shorthands for one statement.

    async def execute(self, sql: str, *args: object) -> int:
        """Run one write statement; the number of rows it changed."""
        return changed(await self._one(lambda db: db.execute(sql, *args)))

    async def execute_many(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        """Run one write statement for each of `rows`, all or none."""
        rows = list(rows)
        if rows:
            await self.atomic(lambda db: db.executemany(sql, rows))

    async def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        return await self._one(lambda db: db.fetch(sql, *args))

    async def fetchrow(self, sql: str, *args: object) -> asyncpg.Record | None:
        return await self._one(lambda db: db.fetchrow(sql, *args))

    async def fetchval(self, sql: str, *args: object) -> object:
        return await self._one(lambda db: db.fetchval(sql, *args))

    async def run(self, call: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """`call` on one connection of the pool, outside a transaction."""
        return await self._one(call)
