"""The schema applied to a SQLite file: the numbered migrations of `node.storage.migrations`,
counted in `PRAGMA user_version`."""

from __future__ import annotations

import sqlite3

from node.storage.migrations import MIGRATIONS


def migrate(db: sqlite3.Connection) -> None:
    """Apply the migrations not yet applied, each in its own transaction."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
        db.executescript(
            f"BEGIN IMMEDIATE; {migration.sqlite}; PRAGMA user_version = {number}; COMMIT;"
        )
