"""The SQLite store: one file in WAL mode, one connection (`connection.Database`), and one
object per aggregate over it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from node.storage.sqlite.audit import SqliteAudit
from node.storage.sqlite.connection import Database
from node.storage.sqlite.keys import SqliteKeys
from node.storage.sqlite.ledger import SqliteLedger
from node.storage.sqlite.migrations import migrate
from node.storage.sqlite.peers import SqlitePeers, prune_nonces
from node.storage.sqlite.responses import SqliteResponses
from node.storage.sqlite.sessions import SqliteSessions, prune_sessions
from node.storage.sqlite.spend import SqliteSpend, prune_leases
from node.storage.sqlite.usage import SqliteUsage


class SqliteStore:
    """`node.storage.base.Store` over one SQLite file."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.keys = SqliteKeys(db)
        self.spend = SqliteSpend(db)
        self.usage = SqliteUsage(db)
        self.peers = SqlitePeers(db)
        self.ledger = SqliteLedger(db)
        self.audit = SqliteAudit(db)
        self.responses = SqliteResponses(db)
        self.sessions = SqliteSessions(db)

    @classmethod
    async def open(cls, path: Path) -> SqliteStore:
        """Open (or create) the database at `path` and bring its schema up to date."""
        return cls(await Database.open(path, migrate))

    async def close(self) -> None:
        await self.db.close()

    async def ping(self) -> bool:
        return (await self.db.fetchone("SELECT 1")) == (1,)

    async def prune(self, now: int) -> None:
        """Forget nonces, rate counts, parallel slots and sessions that can no longer
        matter."""

        def prune(db: sqlite3.Connection) -> None:
            prune_nonces(db, now)
            prune_leases(db, now)
            prune_sessions(db, now)

        await self.db.atomic(prune)
