"""Moving a node's SQLite file into PostgreSQL (`aihub db copy`): every table, row for row,
into a database that has the schema and nothing else, in one transaction.

The two schemas are the same numbered migrations (`migrations`), so the tables and columns are
the same; what differs is how a value is held: a JSON column SQLite kept as a blob becomes text,
a flag stays 0 or 1. The copy's `file_id` is the new database's own, so that the node does not
take the copy for a restored backup and re-sync every chain (the copy is exactly as current as
the file, if the node was stopped while it was made).
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import asyncpg

from node.storage.migrations import MIGRATIONS
from node.storage.postgres.connection import Database, database_id, lock_key

# The schema's own bookkeeping, and the processes that served the file (they serve it no
# more), not the node's records: never copied.
_NOT_COPIED = {"aihub_schema", "sqlite_sequence", "processes"}
# Which database this is: the target's own, never the source's.
_META_FILE_ID = "file_id"


class CopyRefused(Exception):
    """The copy cannot be made (the source is not up to date, the target holds records)."""


def _source_tables(db: sqlite3.Connection) -> list[str]:
    rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
    return [name for (name,) in rows if name not in _NOT_COPIED]


def _as_postgres(value: object, kind: str) -> object:
    """A value SQLite held, as the PostgreSQL column of type `kind` takes it."""
    if isinstance(value, bytes) and kind == "text":
        return value.decode()
    if isinstance(value, str) and kind == "bytea":
        return value.encode()
    return value


async def _column_types(db: asyncpg.Connection, table: str) -> dict[str, str]:
    rows = await db.fetch(
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = $1",
        table,
    )
    return {row[0]: row[1] for row in rows}


async def copy_sqlite_to_postgres(source: Path, url: str, password: str | None) -> dict[str, int]:
    """Copy every record of the SQLite file at `source` into the PostgreSQL database at `url`
    (migrated here first; it must hold no records yet); the rows copied per table."""
    with contextlib.closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as sqlite:
        (version,) = sqlite.execute("PRAGMA user_version").fetchone()
        if version != len(MIGRATIONS):
            raise CopyRefused(
                f"{source} has {version} of {len(MIGRATIONS)} migrations: start the node on"
                " it once (or run `aihub db migrate`) before copying"
            )
        database = await Database.open(url, password, pool_size=1)
        try:
            return await database.atomic(lambda db: _copy(sqlite, db))
        finally:
            await database.close()


async def _copy(sqlite: sqlite3.Connection, db: asyncpg.Connection) -> dict[str, int]:
    # One copy at a time into a database; no node may be writing into it meanwhile.
    await db.execute("SELECT pg_advisory_xact_lock($1)", lock_key("db copy"))
    tables = _source_tables(sqlite)
    for table in tables:
        if await db.fetchval(f'SELECT EXISTS (SELECT 1 FROM "{table}")'):
            raise CopyRefused(f"the target database holds records already (table {table})")
    copied: dict[str, int] = {}
    for table in tables:
        kinds = await _column_types(db, table)
        cursor = sqlite.execute(f'SELECT * FROM "{table}"')
        columns = [description[0] for description in cursor.description]
        rows = [
            tuple(
                _as_postgres(value, kinds[column])
                for value, column in zip(row, columns, strict=True)
            )
            for row in cursor
            if not (table == "node_meta" and row[0] == _META_FILE_ID)
        ]
        if rows:
            await db.copy_records_to_table(table, records=rows, columns=columns)
        copied[table] = len(rows)
    await db.execute(
        "INSERT INTO node_meta (name, value) VALUES ($1, $2)", _META_FILE_ID, await database_id(db)
    )
    # The audit log's ids go on from the last one copied.
    await db.execute(
        "SELECT setval(pg_get_serial_sequence('audit', 'id'), COALESCE(MAX(id), 0) + 1, false)"
        " FROM audit"
    )
    return copied
