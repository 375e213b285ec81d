"""A node on PostgreSQL, run for real: `[storage]` in its config (the password from the
environment, never in the file), `aihub db migrate` and `aihub db copy`, and `aihub serve` on a
database the test suite started."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
from click.testing import CliRunner, Result

from node.cli.main import main
from node.storage import opened
from tests.conftest import NodeDir, wait_ready
from tests.mocks.server import free_port
from tests.postgres import PASSWORD_ENV

STORAGE_DEFAULT = 'url = ""'


def aihub(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=True)


def said(result: Result) -> str:
    """What a command printed, without the line breaks of the console's width."""
    return " ".join(result.output.split())


def use_postgres(node: NodeDir, url: str) -> None:
    """Point the node's config at `url`, its password in PASSWORD_ENV."""
    node.set_config(STORAGE_DEFAULT, f'url = "{url}"\npassword_env = "{PASSWORD_ENV}"')


def moved_to_postgres(node: NodeDir, url: str) -> None:
    """What a user does to move a node: copy its store, then point its config at the copy."""
    copied = aihub(
        "db", "copy", "--to", url, "--password-env", PASSWORD_ENV, "--data-dir", str(node.path)
    )
    assert copied.exit_code == 0, copied.output
    use_postgres(node, url)


@contextmanager
def serving(
    path: Path, log: Path, port: int | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A real `aihub serve` process on the node in `path`; its URL and the process."""
    port = port or free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "serve", "--port", str(port), "--data-dir", str(path)],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def test_config_check_refuses_a_password_in_the_url(node_dir: NodeDir) -> None:
    node_dir.set_config(STORAGE_DEFAULT, 'url = "postgresql://aihub:hunter2@db.internal/aihub"')
    result = aihub("config", "check", "--data-dir", str(node_dir.path))
    assert result.exit_code == 1
    assert "holds a password" in said(result) and "password_env" in said(result)
    assert "Traceback" not in result.output


def test_config_check_names_a_password_variable_that_is_not_set(node_dir: NodeDir) -> None:
    node_dir.set_config(
        STORAGE_DEFAULT,
        'url = "postgresql://aihub@db.internal/aihub"\npassword_env = "AIHUB_SURELY_UNSET_PW"',
    )
    result = aihub("config", "check", "--data-dir", str(node_dir.path))
    assert result.exit_code == 1
    assert "AIHUB_SURELY_UNSET_PW is not set" in said(result)


def test_db_migrate_says_what_it_did(node_dir: NodeDir, postgres_url: str) -> None:
    use_postgres(node_dir, postgres_url)
    first = aihub("db", "migrate", "--data-dir", str(node_dir.path))
    assert first.exit_code == 0, first.output
    assert "schema 0 → 11" in said(first) and "applied migrations 1, 2" in said(first)
    again = aihub("db", "migrate", "--data-dir", str(node_dir.path))
    assert again.exit_code == 0 and "up to date (11 migrations)" in said(again)
    assert "hunter" not in again.output and "postgresql://aihub@" in again.output


def test_db_migrate_on_the_default_sqlite_file(node_dir: NodeDir) -> None:
    result = aihub("db", "migrate", "--data-dir", str(node_dir.path))
    assert result.exit_code == 0, result.output
    assert "aihub.db:schemauptodate(11migrations)" in "".join(result.output.split())


def test_an_unreachable_database_is_said_not_a_traceback(node_dir: NodeDir, monkeypatch) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "x")
    use_postgres(node_dir, f"postgresql://aihub@127.0.0.1:{free_port()}/aihub")
    result = aihub("db", "migrate", "--data-dir", str(node_dir.path))
    assert result.exit_code == 1, result.output
    assert "error:" in result.output and "Traceback" not in result.output


def test_a_node_serves_from_postgres(node_dir: NodeDir, postgres_url: str, tmp_path: Path) -> None:
    moved_to_postgres(node_dir, postgres_url)
    with serving(node_dir.path, tmp_path / "serve.log") as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key=node_dir.key)
        answer = client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.choices[0].message.content
        request_id = answer.id

    async def usage() -> list[str]:
        async with opened(postgres_url, password=os.environ[PASSWORD_ENV]) as store:
            return [record.model for record in await store.usage.usage_since(0)]

    # Written to PostgreSQL (drained from the journal when the process stopped at the latest).
    assert asyncio.run(usage()) == ["echo"], request_id
    assert "Traceback" not in (tmp_path / "serve.log").read_text()
