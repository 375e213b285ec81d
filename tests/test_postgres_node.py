"""A node on PostgreSQL, run for real: `[storage]` in its config (the password from the
environment, never in the file), `aihub db migrate` and `aihub db copy`, and `aihub serve` on a
database the test suite started."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import msgspec
import openai
from click.testing import CliRunner, Result

from node.cli.main import main
from node.config import DATABASE_FILE
from node.gateway.policy import period_start
from node.storage import opened
from node.storage.migrations import MIGRATIONS
from node.storage.records import HOLD_TTL
from tests.conftest import NodeDir, wait_ready
from tests.mocks.server import free_port
from tests.postgres import PASSWORD_ENV, postgres_server
from tests.relay import relay_to
from tests.test_budgets import make_key, priced_echo
from tests.test_federation import LLAMA, answers, cli, invite, make_peer, wait_for

STORAGE_DEFAULT = 'url = ""'
LATEST = len(MIGRATIONS)


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
    assert f"schema 0 → {LATEST}" in said(first) and "applied migrations 1, 2" in said(first)
    again = aihub("db", "migrate", "--data-dir", str(node_dir.path))
    assert again.exit_code == 0 and f"up to date ({LATEST} migrations)" in said(again)
    assert "hunter" not in again.output and "postgresql://aihub@" in again.output


def test_db_migrate_on_the_default_sqlite_file(node_dir: NodeDir) -> None:
    result = aihub("db", "migrate", "--data-dir", str(node_dir.path))
    assert result.exit_code == 0, result.output
    assert f"aihub.db:schemauptodate({LATEST}migrations)" in "".join(result.output.split())


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


def test_db_copy_moves_a_sqlite_node_with_its_books(postgres_url: str, tmp_path: Path) -> None:
    """Alice served bob on SQLite (usage, spend, peers, receipts both countersigned); her
    store copied to PostgreSQL holds all of it, `aihub ledger verify` finds every chain whole,
    and she serves from the copy, the chain going on where it stopped."""
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    with alice.run() as a, bob.run() as b:
        cli("join", invite(alice), "--data-dir", str(bob.path))
        assert wait_for(lambda: answers(b, "llama3", max_tokens=3))
        for _ in range(3):
            assert answers(b, "llama3", max_tokens=3)
        assert answers(a, "echo")
    before = ledger_rows(alice.path)
    assert before["receipts"] >= 4

    copied = aihub(
        "db",
        "copy",
        "--to",
        postgres_url,
        "--password-env",
        PASSWORD_ENV,
        "--data-dir",
        str(alice.path),
    )
    assert copied.exit_code == 0, copied.output
    assert f"receipts: {before['receipts']}" in said(copied)
    again = aihub(
        "db",
        "copy",
        "--to",
        postgres_url,
        "--password-env",
        PASSWORD_ENV,
        "--data-dir",
        str(alice.path),
    )
    assert again.exit_code == 1 and "holds records already" in said(again)
    use_postgres(alice.dir, postgres_url)

    checks = msgspec.json.decode(cli("ledger", "verify", "--json", "--data-dir", str(alice.path)))
    assert checks and all(check["ok"] for check in checks), checks

    async def counts() -> dict[str, int]:
        async with opened(postgres_url, password=os.environ[PASSWORD_ENV]) as store:
            (pair,) = await store.ledger.receipt_pairs()
            return {
                "receipts": len(await store.ledger.receipts(*pair)),
                "usage": len(await store.usage.usage_since(0)),
                "peers": len(await store.peers.peers()),
                "keys": len(await store.keys.keys()),
            }

    assert asyncio.run(counts()) == before
    with alice.run(), bob.run() as b:
        assert answers(b, "llama3", max_tokens=3)
    assert asyncio.run(counts())["receipts"] == before["receipts"] + 1
    checks = msgspec.json.decode(cli("ledger", "verify", "--json", "--data-dir", str(alice.path)))
    assert all(check["ok"] for check in checks), checks


def ledger_rows(path: Path) -> dict[str, int]:
    """What the SQLite file holds, counted straight from its tables."""
    with contextlib.closing(sqlite3.connect(path / DATABASE_FILE)) as db:
        return {
            table: db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            for table in ("receipts", "usage", "peers", "keys")
        }


def test_a_database_that_goes_away_is_a_503_and_comes_back_without_a_restart(
    node_dir: NodeDir, tmp_path: Path
) -> None:
    """PostgreSQL stopped under a running node: a request that needs it (a budgeted key's
    reservation) is a clear 503 with Retry-After, the readiness check says unavailable, and
    once the database is back the same process serves again, nothing restarted."""
    with postgres_server() as server:
        os.environ[PASSWORD_ENV] = server.password
        url = server.url(server.create_database())
        moved_to_postgres(node_dir, url)
        key, _ = make_key(node_dir.path, name="budgeted", budget_micros=10**9)
        with serving(node_dir.path, tmp_path / "serve.log") as (base, process):
            client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
            chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
            assert client.chat.completions.create(**chat).choices  # type: ignore[call-overload]
            server.stop()
            try:
                client.chat.completions.create(**chat)  # type: ignore[call-overload]
            except openai.APIStatusError as refused:
                assert refused.status_code == 503
                assert refused.response.headers["retry-after"] == "1"
                assert refused.body["code"] == "store_unavailable"  # type: ignore[index]
            else:
                raise AssertionError("a request needing the database must be refused")
            assert httpx.get(base + "/health/ready").status_code == 503
            server.start()
            assert wait_for(lambda: httpx.get(base + "/health/ready").status_code == 200)
            assert client.chat.completions.create(**chat).choices  # type: ignore[call-overload]
            assert process.poll() is None
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log, log


def test_db_copy_refuses_what_it_cannot_use(node_dir: NodeDir, postgres_url: str) -> None:
    """A password in --to, a URL that is no PostgreSQL's, a password variable that is not set,
    a node already on PostgreSQL: each refused in words, nothing echoed of a password."""
    folder = str(node_dir.path)
    cases = [
        (["--to", "postgresql://aihub:hunter2@127.0.0.1/x"], "holds a password"),
        (["--to", "mysql://db/x"], "not a PostgreSQL URL"),
        (["--to", "postgresql://aihub@127.0.0.1:99999999/x"], "not a PostgreSQL URL"),
        (["--to", postgres_url, "--password-env", "AIHUB_SURELY_UNSET_PW"], "is not set"),
    ]
    for args, why in cases:
        result = aihub("db", "copy", *args, "--data-dir", folder)
        assert result.exit_code == 1, (args, result.output)
        assert why in said(result) and "hunter2" not in result.output, (args, result.output)
        assert "Traceback" not in result.output
    use_postgres(node_dir, postgres_url)
    result = aihub("db", "copy", "--to", postgres_url, "--data-dir", folder)
    assert result.exit_code == 1 and "PostgreSQL already" in said(result)


def test_serve_on_a_database_it_cannot_reach_says_so(node_dir: NodeDir, monkeypatch) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "x")
    use_postgres(node_dir, f"postgresql://aihub@127.0.0.1:{free_port()}/aihub")
    result = aihub("serve", "--port", str(free_port()), "--data-dir", str(node_dir.path))
    assert result.exit_code == 1, result.output
    assert "the store cannot be reached" in said(result) and "Traceback" not in result.output
    monkeypatch.delenv(PASSWORD_ENV)
    result = aihub("serve", "--port", str(free_port()), "--data-dir", str(node_dir.path))
    assert result.exit_code == 1 and f"{PASSWORD_ENV} is not set" in said(result)


def test_after_an_outage_longer_than_a_hold_lives_no_lease_is_spent_twice(
    node_dir: NodeDir, tmp_path: Path, monkeypatch
) -> None:
    """A node holding a lease cut off from PostgreSQL, which then crashes, for longer than a
    budget hold lives (HOLD_TTL): once the database is back, another host (the test, here)
    gives the node's expired holds back and reserves all that is left of the budget, before
    the node can reach the database again. The node's next request must not be served from
    its old lease, which is no longer reserved (that would spend past the cap): it renews
    first, finds its holds gone, and is refused for budget. (The node reaches the database
    through a relay the test cuts: had the node reached it as soon as it was back, its
    renewal could come first and keep its holds, rightly, and the test would prove
    nothing; it failed that way in CI.)"""
    with postgres_server() as server, relay_to(server.port) as relay:
        monkeypatch.setenv(PASSWORD_ENV, server.password)
        url = server.url(server.create_database())
        moved_to_postgres(node_dir, url.replace(f":{server.port}/", f":{relay.port}/"))
        priced_echo(node_dir)
        key, key_id = make_key(node_dir.path, name="budgeted", budget_micros=OUTAGE_CAP)
        scope = [(f"key:{key_id}", period_start("monthly", time.time()))]
        with serving(node_dir.path, tmp_path / "serve.log") as (base, _):
            client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
            chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
            assert client.chat.completions.create(**chat, max_tokens=3).choices  # type: ignore[call-overload]
            # The test server commits asynchronously and stops as in a crash: what the node
            # has committed (its lease) is made to outlive the stop, as it would on a real one.
            server.psql("CHECKPOINT", database=url.rsplit("/", 1)[1])
            relay.cut()
            server.stop()
            time.sleep(HOLD_TTL + 1)  # the outage itself: longer than a hold lives
            server.start()

            async def take_the_rest() -> None:
                async with opened(url, password=server.password) as store:
                    await store.prune(int(time.time()))  # the node's holds have expired
                    (row,) = await store.spend.spend(scope)
                    assert row.reserved == 0  # given back, all of it
                    assert await store.spend.reserve(row.cap - row.spent, scope, "other-host")

            asyncio.run(take_the_rest())
            relay.restore()
            assert wait_for(lambda: httpx.get(base + "/health/ready").status_code == 200)
            try:
                client.chat.completions.create(**chat, max_tokens=3)  # type: ignore[call-overload]
            except openai.RateLimitError as refused:
                assert refused.body["code"] == "insufficient_quota"  # type: ignore[index]
            else:
                raise AssertionError("served from a lease that was given back")

            async def row_now() -> tuple[int, int, int]:
                async with opened(url, password=server.password) as store:
                    (row,) = await store.spend.spend(scope)
                return row.spent, row.reserved, row.cap

            spent, reserved, cap = asyncio.run(row_now())
            assert spent + reserved <= cap
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log, log


OUTAGE_CAP = 1_000_000  # a lease of sixteen requests' worth (`node/gateway/budgets.py`)
