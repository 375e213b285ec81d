"""The PostgreSQL store: a pool of connections to one database (`connection.Database`), and
one object per aggregate over it. Every process of the node opens its own."""

from __future__ import annotations

import asyncpg

from node.storage.postgres.audit import PostgresAudit
from node.storage.postgres.connection import Database
from node.storage.postgres.keys import PostgresKeys
from node.storage.postgres.ledger import PostgresLedger
from node.storage.postgres.peers import PostgresPeers, prune_nonces
from node.storage.postgres.responses import PostgresResponses
from node.storage.postgres.spend import PostgresSpend, prune_leases
from node.storage.postgres.usage import PostgresUsage


class PostgresStore:
    """`node.storage.base.Store` over one PostgreSQL database."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.keys = PostgresKeys(db)
        self.spend = PostgresSpend(db)
        self.usage = PostgresUsage(db)
        self.peers = PostgresPeers(db)
        self.ledger = PostgresLedger(db)
        self.audit = PostgresAudit(db)
        self.responses = PostgresResponses(db)

    @classmethod
    async def open(
        cls, url: str, password: str | None, *, pool_size: int = 10, migrate: bool = True
    ) -> PostgresStore:
        """Connect to the database at `url` and bring its schema up to date."""
        return cls(await Database.open(url, password, pool_size=pool_size, migrate_now=migrate))

    async def close(self) -> None:
        await self.db.close()

    async def ping(self) -> bool:
        return (await self.db.fetchval("SELECT 1")) == 1

    async def database_id(self) -> str:
        """Which database this is: the cluster's system identifier and the database's oid.
        A dump restored (into another database, or another cluster) has another."""
        row = await self.db.fetchrow(
            "SELECT (SELECT system_identifier FROM pg_control_system()),"
            " (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        assert row is not None
        return f"pg:{row[0]}:{row[1]}"

    async def prune(self, now: int) -> None:
        """Forget nonces, rate counts and parallel slots that can no longer matter."""

        async def prune(db: asyncpg.Connection) -> None:
            await prune_nonces(db, now)
            await prune_leases(db, now)

        await self.db.atomic(prune)
