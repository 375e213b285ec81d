"""`aihub db migrate` and `aihub db copy`: the node's store, its schema brought up to date, and
a SQLite node moved to PostgreSQL (DESIGN.md, Storage; docs/storage.md)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import asyncpg
import click
from rich.markup import escape

from node.cli.folder import require_config
from node.cli.options import with_data_dir
from node.cli.output import console, fail
from node.config import ConfigError, store_target
from node.storage import apply_migrations, check_postgres_url, is_postgres, redacted
from node.storage.copy import CopyRefused, copy_sqlite_to_postgres
from node.storage.records import StoreUnavailable

# What a database that cannot be reached, or refuses us, raises: said, never a traceback.
_UNREACHABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    StoreUnavailable,
)


@click.group("db")
def db_group() -> None:
    """The node's store: its schema, and moving it to PostgreSQL."""


@db_group.command("migrate")
@with_data_dir
def migrate(directory: Path) -> None:
    """Bring the store's schema up to date (`aihub serve` does it too, at start)."""
    config = require_config(directory)
    try:
        target = store_target(directory, config)
    except ConfigError as exc:
        fail(str(exc))
    try:
        found, applied = asyncio.run(apply_migrations(target.url, password=target.password))
    except _UNREACHABLE as exc:
        fail(f"{redacted(target.url)}: {exc}")
    where = escape(redacted(target.url))
    if applied:
        console.print(
            f"{where}: schema {found} → {applied[-1]}: applied migrations"
            f" {', '.join(map(str, applied))}",
            highlight=False,
        )
    else:
        console.print(f"{where}: schema up to date ({found} migrations)", highlight=False)


@db_group.command("copy")
@click.option("--to", "url", required=True, help="postgresql://user@host:port/database")
@click.option(
    "--password-env",
    help="The environment variable holding the database's password"
    " [default: libpq's PGPASSWORD or ~/.pgpass]",
)
@with_data_dir
def copy(directory: Path, url: str, password_env: str | None) -> None:
    """Copy this node's SQLite store (keys, spend, usage, peers, receipts and their chains,
    all of it) into an empty PostgreSQL database. Stop the node first."""
    config = require_config(directory)
    source = store_target(directory, config).url
    if is_postgres(source):
        fail("the node's store is PostgreSQL already ([storage] url): nothing to copy from")
    try:
        check_postgres_url(url)
    except ValueError as exc:
        fail(str(exc))
    password = None
    if password_env:
        password = os.environ.get(password_env)
        if not password:
            fail(f"environment variable {password_env} is not set")
    try:
        copied = asyncio.run(copy_sqlite_to_postgres(Path(source), url, password))
    except CopyRefused as exc:
        fail(str(exc))
    except _UNREACHABLE as exc:
        fail(f"{url}: {exc}")
    total = sum(copied.values())
    console.print(
        f"copied {total} records of {escape(str(source))} into {escape(url)}:", highlight=False
    )
    for table, count in sorted(copied.items()):
        if count:
            console.print(f"  {table}: {count}", highlight=False)
    console.print("To serve from it, set in config.toml:", highlight=False)
    console.print(f'  [storage]\n  url = "{escape(url)}"', highlight=False)
    if password_env:
        console.print(f'  password_env = "{escape(password_env)}"', highlight=False)
    console.print("then check it with `aihub ledger verify`.", highlight=False)
