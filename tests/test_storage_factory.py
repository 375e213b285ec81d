"""The storage factory: which URLs open which database, and a clear error for the rest."""

from __future__ import annotations

import asyncio
import inspect
import os
from pathlib import Path

import pytest

from node.storage import SCHEMES, base, open_store, opened, sqlite_path
from tests.postgres import PASSWORD_ENV


def test_sqlite_urls_and_paths_name_files() -> None:
    assert sqlite_path("sqlite:///var/lib/aihub/db") == Path("/var/lib/aihub/db")
    assert sqlite_path("sqlite:data/db") == Path("data/db")
    assert sqlite_path(Path("data/db")) == Path("data/db")
    assert sqlite_path("data/db") == Path("data/db")


@pytest.mark.parametrize("url", ["sqlite://host/db", "sqlite:", "sqlite://", "sqlite:///"])
def test_a_sqlite_url_without_a_file_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="sqlite URL"):
        sqlite_path(url)


def test_an_unknown_scheme_names_the_schemes_known() -> None:
    with pytest.raises(ValueError) as refused:
        asyncio.run(open_store("mysql://db.internal/aihub"))
    message = str(refused.value)
    assert "'mysql'" in message
    assert all(scheme in message for scheme in SCHEMES)


def test_each_form_opens_the_same_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    async def run() -> None:
        store = await open_store(f"sqlite://{tmp_path / 'db'}")
        try:
            assert await store.ping()
            assert await store.peers.next_counter("c") == 1
        finally:
            await store.close()
        async with opened("sqlite:db") as store:
            assert await store.peers.next_counter("c") == 2
        async with opened(tmp_path / "db") as store:
            assert await store.peers.next_counter("c") == 3

    asyncio.run(run())


def test_each_store_offers_every_method_of_each_interface(store_url: str) -> None:
    """No type checker runs in `make test`: this pins each backend to `base`, method by
    method and signature by signature."""

    async def run() -> None:
        async with opened(store_url, password=os.environ.get(PASSWORD_ENV)) as store:
            for attribute, interface in inspect.get_annotations(base.Store).items():
                implementation = getattr(store, attribute)
                for name, method in vars(resolve(interface)).items():
                    if name.startswith("_") or not callable(method):
                        continue
                    assert inspect.signature(getattr(implementation, name)) == inspect.signature(
                        method.__get__(implementation)
                    ), f"store.{attribute}.{name}"
            for name in ("close", "ping", "watch", "database_id", "prune"):
                assert inspect.signature(getattr(store, name)) == inspect.signature(
                    getattr(base.Store, name).__get__(store)
                )

    asyncio.run(run())


def resolve(annotation: object) -> type:
    return getattr(base, annotation) if isinstance(annotation, str) else annotation  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("postgresql://aihub:secret@db.internal/aihub", "holds a password"),
        ("postgresql:///aihub", "names a host"),
        ("postgresql://aihub@db.internal", "names a database"),
        ("postgresql://aihub@db.internal:port/aihub", "not a PostgreSQL URL"),
    ],
)
def test_a_postgres_url_is_checked_before_connecting(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as refused:
        asyncio.run(open_store(url))
    assert "secret" not in str(refused.value)
