"""The PostgreSQL store: a pool of connections to one database (`connection.Database`), and
one object per aggregate over it. Every process of the node opens its own."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg

from node.storage.postgres.audit import PostgresAudit
from node.storage.postgres.cache import PostgresCache
from node.storage.postgres.changes import ChangeWatch
from node.storage.postgres.connection import Database, database_id
from node.storage.postgres.keys import PostgresKeys
from node.storage.postgres.ledger import PostgresLedger
from node.storage.postgres.logs import PostgresLogs
from node.storage.postgres.peers import PostgresPeers, prune_nonces
from node.storage.postgres.processes import PostgresProcesses, prune_processes
from node.storage.postgres.responses import PostgresResponses
from node.storage.postgres.sessions import PostgresSessions, prune_sessions
from node.storage.postgres.spend import PostgresSpend, prune_leases
from node.storage.postgres.usage import PostgresUsage


class PostgresStore:
    """`node.storage.base.Store` over one PostgreSQL database."""

    def __init__(self, db: Database, url: str, password: str | None) -> None:
        self.db = db
        self._url = url
        self._password = password
        self._watch: ChangeWatch | None = None
        self.keys = PostgresKeys(db)
        self.spend = PostgresSpend(db)
        self.usage = PostgresUsage(db)
        self.peers = PostgresPeers(db)
        self.ledger = PostgresLedger(db)
        self.audit = PostgresAudit(db)
        self.responses = PostgresResponses(db)
        self.cache = PostgresCache(db)
        self.logs = PostgresLogs(db)
        self.sessions = PostgresSessions(db)
        self.processes = PostgresProcesses(db)

    @classmethod
    async def open(
        cls, url: str, password: str | None, *, pool_size: int = 10, migrate: bool = True
    ) -> PostgresStore:
        """Connect to the database at `url` and bring its schema up to date."""
        database = await Database.open(url, password, pool_size=pool_size, migrate_now=migrate)
        return cls(database, url, password)

    @classmethod
    async def migrate(cls, url: str, password: str | None) -> tuple[int, list[int]]:
        """(the schema version found, the migrations applied now)."""
        db = await Database.open(url, password, pool_size=1, migrate_now=False)
        try:
            return await db.migrate()
        finally:
            await db.close()

    async def close(self) -> None:
        if self._watch is not None:
            await self._watch.stop()
        await self.db.close()

    async def watch(self, changed: Callable[[str], None]) -> None:
        """From now on, `changed("keys")` or `changed("peers")` whenever any process (another
        host, the CLI) commits a change to them (`changes.ChangeWatch`)."""
        if self._watch is None:
            self._watch = ChangeWatch(self._url, self._password, changed)
            await self._watch.start()

    async def ping(self) -> bool:
        return (await self.db.fetchval("SELECT 1")) == 1

    async def database_id(self) -> str:
        """Which database this is (`connection.database_id`)."""
        return await self.db.run(database_id)

    async def prune(self, now: int) -> None:
        """Forget nonces, rate counts, parallel slots, dashboard sessions and processes that
        can no longer matter."""

        async def prune(db: asyncpg.Connection) -> None:
            await prune_nonces(db, now)
            await prune_leases(db, now)
            await prune_sessions(db, now)
            await prune_processes(db)

        await self.db.atomic(prune)
