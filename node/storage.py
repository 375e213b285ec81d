"""The node's embedded store: aiosqlite in WAL mode, schema by numbered migrations.

All SQL lives here, so that another backend (PostgreSQL, for several gateway processes of one
node) can be added beside this one without touching the rest.
"""

from __future__ import annotations

import time
from pathlib import Path

import aiosqlite
import msgspec

MIGRATIONS: list[str] = [
    # 1: keys and usage
    """
    CREATE TABLE keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        hash BLOB NOT NULL,
        is_admin INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL,
        revoked_at INTEGER
    );
    CREATE TABLE usage (
        request_id TEXT PRIMARY KEY,
        ts_ms INTEGER NOT NULL,
        key_id TEXT,
        model TEXT NOT NULL,
        deployment TEXT,
        provider TEXT,
        endpoint TEXT NOT NULL,
        stream INTEGER NOT NULL,
        tokens_in INTEGER NOT NULL,
        tokens_out INTEGER NOT NULL,
        estimated INTEGER NOT NULL,
        cost_micros INTEGER NOT NULL,
        latency_ms INTEGER NOT NULL,
        status INTEGER NOT NULL,
        error TEXT
    ) WITHOUT ROWID;
    CREATE INDEX usage_ts ON usage (ts_ms);
    CREATE INDEX usage_key_ts ON usage (key_id, ts_ms);
    """,
]


class KeyRecord(msgspec.Struct):
    id: str
    name: str
    hash: bytes
    is_admin: bool
    created_at: int
    revoked_at: int | None = None


class UsageRecord(msgspec.Struct):
    request_id: str
    ts_ms: int
    key_id: str | None
    model: str
    deployment: str | None
    provider: str | None
    endpoint: str
    stream: bool
    tokens_in: int
    tokens_out: int
    estimated: bool
    cost_micros: int
    latency_ms: int
    status: int
    error: str | None = None


class Store:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    @classmethod
    async def open(cls, path: Path) -> Store:
        db = await aiosqlite.connect(path, isolation_level=None)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.execute("PRAGMA busy_timeout=5000")
        await db.execute("PRAGMA foreign_keys=ON")
        store = cls(db)
        await store.migrate()
        return store

    async def close(self) -> None:
        await self.db.close()

    async def migrate(self) -> None:
        """Apply the migrations not yet applied, each in its own transaction."""
        async with self.db.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        version = row[0] if row else 0
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            await self.db.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")

    async def ping(self) -> bool:
        async with self.db.execute("SELECT 1") as cursor:
            return (await cursor.fetchone()) == (1,)

    async def insert_key(self, key: KeyRecord) -> None:
        await self.db.execute(
            "INSERT INTO keys (id, name, hash, is_admin, created_at, revoked_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (key.id, key.name, key.hash, int(key.is_admin), key.created_at, key.revoked_at),
        )

    async def active_keys(self) -> list[KeyRecord]:
        async with self.db.execute(
            "SELECT id, name, hash, is_admin, created_at, revoked_at FROM keys"
            " WHERE revoked_at IS NULL"
        ) as cursor:
            rows = await cursor.fetchall()
        return [KeyRecord(r[0], r[1], r[2], bool(r[3]), r[4], r[5]) for r in rows]

    async def insert_usage(self, records: list[UsageRecord]) -> None:
        """Write a batch of usage records in one transaction (all or none)."""
        rows = [msgspec.structs.astuple(record) for record in records]
        await self.db.execute("BEGIN")
        try:
            await self.db.executemany(
                "INSERT OR IGNORE INTO usage VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows
            )
        except BaseException:
            await self.db.execute("ROLLBACK")
            raise
        await self.db.execute("COMMIT")

    async def usage_since(self, since_ms: int = 0) -> list[UsageRecord]:
        async with self.db.execute(
            "SELECT * FROM usage WHERE ts_ms >= ? ORDER BY ts_ms", (since_ms,)
        ) as cursor:
            rows = await cursor.fetchall()
        return [
            UsageRecord(
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                r[5],
                r[6],
                bool(r[7]),
                r[8],
                r[9],
                bool(r[10]),
                r[11],
                r[12],
                r[13],
                r[14],
            )
            for r in rows
        ]


def now_ms() -> int:
    return int(time.time() * 1000)
