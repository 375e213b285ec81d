"""The node's storage: the records (`records`), one interface per aggregate (`base`), and the
backends that implement them (`sqlite/`), opened by URL through `open_store`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from node.storage.base import Store
from node.storage.sqlite.store import SqliteStore

SCHEMES = ("sqlite",)


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


async def open_store(url: str | Path) -> Store:
    """Open the store a URL names (see `sqlite_path` for the forms); an unknown scheme is a
    ValueError naming the schemes known."""
    path = sqlite_path(url)
    return await SqliteStore.open(path)


@asynccontextmanager
async def opened(url: str | Path) -> AsyncIterator[Store]:
    """The store for the length of a block (a CLI command, a report), then closed."""
    store = await open_store(url)
    try:
        yield store
    finally:
        await store.close()
