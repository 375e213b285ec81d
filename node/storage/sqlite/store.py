"""The SQLite store: one file in WAL mode, one connection (`connection.Database`), and one
object per aggregate over it."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from node.storage.migrations import MIGRATIONS
from node.storage.sqlite.audit import SqliteAudit
from node.storage.sqlite.cache import SqliteCache
from node.storage.sqlite.connection import Database
from node.storage.sqlite.keys import SqliteKeys
from node.storage.sqlite.ledger import SqliteLedger
from node.storage.sqlite.logs import SqliteLogs
from node.storage.sqlite.migrations import migrate
from node.storage.sqlite.peers import SqlitePeers, prune_nonces
from node.storage.sqlite.processes import SqliteProcesses, prune_processes
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
        self.cache = SqliteCache(db)
        self.logs = SqliteLogs(db)
        self.sessions = SqliteSessions(db)
        self.processes = SqliteProcesses(db)

    @classmethod
    async def open(cls, path: Path) -> SqliteStore:
        """Open (or create) the database at `path` and bring its schema up to date."""
        return cls(await Database.open(path, migrate))

    @classmethod
    async def migrate(cls, path: Path) -> tuple[int, list[int]]:
        """(the schema version found, the migrations applied now)."""
        found = _user_version(path)
        store = await cls.open(path)
        await store.close()
        return found, list(range(found + 1, len(MIGRATIONS) + 1))

    async def close(self) -> None:
        await self.db.close()

    async def ping(self) -> bool:
        return (await self.db.fetchone("SELECT 1")) == (1,)

    async def watch(self, changed: Callable[[str], None]) -> None:
        """Nothing to hear: every process of a SQLite node shares its data folder, whose epoch
        files tell them of changes."""

    async def database_id(self) -> str:
        """Which file this is (device and inode): a restored backup is another file."""
        info = os.stat(self.db.path)
        return f"{info.st_dev}:{info.st_ino}"

    async def prune(self, now: int) -> None:
        """Forget nonces, rate counts, parallel slots, sessions and processes that can no
        longer matter."""

        def prune(db: sqlite3.Connection) -> None:
            prune_nonces(db, now)
            prune_leases(db, now)
            prune_sessions(db, now)
            prune_processes(db, now * 1000)

        await self.db.atomic(prune)


def _user_version(path: Path) -> int:
    """How many migrations the file at `path` has (0: no file yet)."""
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(path)) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
