"""The node's storage: the records (`records`), one interface per aggregate (`base`), the
numbered migrations every backend shares (`migrations`), and the backends that implement them
(`sqlite/`, the embedded default; `postgres/`, for a node on several processes or hosts),
opened by URL through `open_store`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

from node.storage.base import Store
from node.storage.records import StoreUnavailable
from node.storage.sqlite.store import SqliteStore

SCHEMES = ("sqlite", "postgresql")

POSTGRES_SCHEMES = ("postgresql", "postgres")


def unreachable_errors() -> tuple[type[BaseException], ...]:
    """What opening a store that cannot be reached raises (a PostgreSQL server down, refusing
    us, or without the database), for the commands to say so in words. A function: the
    PostgreSQL driver is imported only by a node that uses it."""
    from node.storage.postgres.connection import UNREACHABLE

    return (OSError, TimeoutError, StoreUnavailable, *UNREACHABLE)


def is_postgres(url: str | Path) -> bool:
    return isinstance(url, str) and url.partition(":")[0] in POSTGRES_SCHEMES


def sqlite_path(url: str | Path) -> Path:
    """The file a SQLite URL names: `sqlite:///abs/path`, `sqlite:relative/path`, or a path."""
    if isinstance(url, Path):
        return url
    scheme, colon, rest = url.partition(":")
    if not colon or len(scheme) < 2:  # a bare path (or a Windows drive letter)
        return Path(url)
    if scheme != "sqlite":
        raise ValueError(f"unknown storage scheme {scheme!r} in {url!r}: known are {SCHEMES}")
    if rest.startswith("//"):
        # sqlite:///abs/path: an empty authority, then the absolute path
        authority, _, path = rest[2:].partition("/")
        if authority:
            raise ValueError(f"a sqlite URL names no host: {url!r}")
        if not path:
            raise ValueError(f"a sqlite URL names a file: {url!r}")
        return Path("/" + path)
    if not rest:
        raise ValueError(f"a sqlite URL names a file: {url!r}")
    return Path(rest)


def check_postgres_url(url: str) -> None:
    """A PostgreSQL URL names a host and a database, and no password (that comes from the
    environment: a URL is shown in logs, configs and process lists); ValueError says why."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError as exc:
        raise ValueError(f"not a PostgreSQL URL: {exc}") from None
    if parts.scheme not in POSTGRES_SCHEMES:
        raise ValueError(f"not a PostgreSQL URL (postgresql://…): {redacted(url)!r}")
    if parts.password is not None:
        raise ValueError(
            "the PostgreSQL URL holds a password: remove it and name the environment"
            " variable that holds it instead (password_env)"
        )
    if not parts.hostname:
        raise ValueError(f"a PostgreSQL URL names a host: {redacted(url)!r}")
    if not parts.path.strip("/"):
        raise ValueError(f"a PostgreSQL URL names a database: {redacted(url)!r}")


def redacted(url: str | Path) -> str:
    """The URL as it may be shown: any password replaced."""
    if isinstance(url, Path) or "://" not in url:
        return str(url)
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "(a URL that does not parse)"
    if password is None:
        return str(url)
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


async def open_store(
    url: str | Path, *, password: str | None = None, pool_size: int = 10, migrate: bool = True
) -> Store:
    """Open the store a URL names: `postgresql://user@host:port/db` (with `password`, and a
    pool of up to `pool_size` connections), or a SQLite file (see `sqlite_path` for the
    forms). The schema is brought up to date unless `migrate` is False (PostgreSQL: `aihub db
    migrate` may have done it); an unknown scheme is a ValueError naming the schemes known."""
    if is_postgres(url):
        from node.storage.postgres.store import PostgresStore

        check_postgres_url(str(url))
        return await PostgresStore.open(str(url), password, pool_size=pool_size, migrate=migrate)
    return await SqliteStore.open(sqlite_path(url))


async def apply_migrations(
    url: str | Path, *, password: str | None = None
) -> tuple[int, list[int]]:
    """Bring the schema of the store at `url` up to date: (the version it had, the numbers of
    the migrations applied now, none if it was up to date)."""
    if is_postgres(url):
        from node.storage.postgres.store import PostgresStore

        check_postgres_url(str(url))
        return await PostgresStore.migrate(str(url), password)
    return await SqliteStore.migrate(sqlite_path(url))


@asynccontextmanager
async def opened(
    url: str | Path, *, password: str | None = None, pool_size: int = 10
) -> AsyncIterator[Store]:
    """The store for the length of a block (a CLI command, a report), then closed."""
    store = await open_store(url, password=password, pool_size=pool_size)
    try:
        yield store
    finally:
        await store.close()
