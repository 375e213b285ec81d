"""A real PostgreSQL server for the test suite (and the storage bench): `initdb` and `pg_ctl` on
loopback in a temporary folder, once per session, and a fresh database per test.

The binaries come from PATH or Debian's /usr/lib/postgresql/*/bin (`.ci/run` and `make test`
install the `postgresql` package when they are missing). initdb refuses to run as root, and the
suite runs as root in CI: then the server runs as the unprivileged `postgres` system user (the
package creates it), on a folder that user owns. The server listens on 127.0.0.1 only, with no
Unix socket, and asks every client for a password (scram-sha-256), so that the node's
`password_env` is exercised for real.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from node.storage import open_store
from node.storage.base import Store

USER = "aihub"
PASSWORD_ENV = "AIHUB_TEST_PG_PASSWORD"


def binaries() -> Path | None:
    """The folder holding initdb and pg_ctl: PATH first, else the newest Debian version."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: int(Path(path).parent.parent.name),
    )
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class PostgresServer:
    """One running server: where it is, and how to reach it."""

    folder: Path
    port: int
    password: str
    run_as: str | None
    settings: str = ""  # more `-c name=value` options for the server (the bench's)

    def url(self, database: str = "postgres") -> str:
        """A URL without the password (the node reads that from `password_env`)."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL through psql (as a client, over TCP, with the password)."""
        command = [str(self.folder / "bin" / "psql"), "-X", "-q", "-A", "-t", "-v"]
        command += ["ON_ERROR_STOP=1", "-d", self.url(database), "-c", sql]
        env = {**os.environ, "PGPASSWORD": self.password}
        return subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout

    def create_database(self) -> str:
        """A fresh, empty database; its name."""
        name = "t_" + secrets.token_hex(6)
        self.psql(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def pg_ctl(self, *args: str) -> None:
        """Run pg_ctl on this server's folder, as the user the server runs as."""
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories=''"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            " -c max_connections=200"
        )
        if self.settings:
            options += " " + self.settings
        command = [self.folder / "bin" / "pg_ctl", "-D", self.folder / "data", "-w"]
        command += ["-l", self.folder / "log", "-o", options, *args]
        subprocess.run(command, check=True, capture_output=True, **_as_user(self.run_as))

    def stop(self) -> None:
        """Stop the server at once (every client connection is cut)."""
        self.pg_ctl("-m", "immediate", "stop")

    def start(self) -> None:
        self.pg_ctl("start")


# Passwords over TCP for everyone; a test cluster needs no locale and no fsync.
_INITDB = ("--auth=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync")


def _as_user(user: str | None) -> dict:
    """Popen arguments that run a command as `user` (when we are root)."""
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


@contextmanager
def postgres_server(settings: str = "") -> Iterator[PostgresServer]:
    """Start a server in a new temporary folder (with `settings`, more `-c name=value`
    options); stop it and remove the folder after."""
    bindir = binaries()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
    run_as = "postgres" if os.geteuid() == 0 else None
    folder = Path(tempfile.mkdtemp(prefix="aihub-pg-"))
    password = secrets.token_urlsafe(16)
    try:
        # The client tools of the same version, reachable from the folder (psql may be an
        # older one on PATH otherwise).
        (folder / "bin").symlink_to(bindir)
        data = folder / "data"
        data.mkdir(mode=0o700)
        (folder / "pw").write_text(password)
        if run_as is not None:
            entry = pwd.getpwnam(run_as)
            for path in (folder, data, folder / "pw"):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        subprocess.run(
            [bindir / "initdb", "-D", data, "-U", USER, "--pwfile", folder / "pw", *_INITDB],
            check=True,
            capture_output=True,
            **_as_user(run_as),
        )
        server = PostgresServer(folder, _free_port(), password, run_as, settings)
        server.start()
        try:
            yield server
        finally:
            with contextlib.suppress(subprocess.CalledProcessError):
                server.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server."""
    with postgres_server() as server:
        yield server


@pytest.fixture
def postgres_url(postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh database on the session's server, its URL; the password in `PASSWORD_ENV`."""
    monkeypatch.setenv(PASSWORD_ENV, postgres.password)
    name = postgres.create_database()
    try:
        yield postgres.url(name)
    finally:
        postgres.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store's URL, of each backend in turn (the storage tests run on both)."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'aihub.db'}"
    return request.getfixturevalue("postgres_url")


async def open_test_store(url: str, **options: object) -> Store:
    """`open_store`, with the test server's password when the URL is PostgreSQL's."""
    return await open_store(url, password=os.environ.get(PASSWORD_ENV), **options)  # type: ignore[arg-type]
