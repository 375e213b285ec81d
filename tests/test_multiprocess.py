"""One node on two processes, as on two hosts behind a load balancer: two `aihub serve`
processes, each with a data folder of its own (the same identity and config, different ports),
sharing one PostgreSQL database (and, for what a killed process held, two processes on one
SQLite file, as `--workers` runs). What must hold: a budget is never passed by requests spread
over both, a key created or revoked through one is honoured by the other on its next request,
and one pair's receipt chain never forks or gaps when both issue receipts."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import asyncpg
import httpx
import msgspec
from click.testing import CliRunner

from node.admin.management import KeyInput, Management
from node.cli.main import main
from node.gateway.journal import JOURNAL_DIR
from node.gateway.policy import period_start
from node.storage import opened
from node.storage.records import StoredReceipt, body_hash
from tests.conftest import NodeDir, concurrent_client, serve_process
from tests.mocks.server import free_port
from tests.postgres import PASSWORD_ENV
from tests.procfs import client_sockets, listening_workers
from tests.test_budgets import CAP, WORST, fire, make_key, priced_echo, spend_of
from tests.test_federation import LLAMA, _bobs_key_at_alice, cli, invite, make_peer, wait_for
from tests.test_postgres_node import moved_to_postgres, serving
from tests.test_replay_limits import BODY, CHAT, _join, is_replay, post_as, signed


def second_host(node: NodeDir, tmp_path: Path) -> Path:
    """Another host's data folder for the same node: its identity and config, nothing else
    of the first's (no journal, no epoch files, no SQLite file)."""
    other = tmp_path / "second-host"
    shutil.copytree(
        node.path,
        other,
        ignore=shutil.ignore_patterns(JOURNAL_DIR, "*.epoch", "aihub.db*", "*.log"),
    )
    return other


@contextmanager
def two_processes(node: NodeDir, url: str, tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """The node moved to PostgreSQL at `url`, served by two processes on two folders: their
    URLs and the second folder."""
    moved_to_postgres(node, url)
    other = second_host(node, tmp_path)
    with ExitStack() as stack:
        first, _ = stack.enter_context(serving(node.path, tmp_path / "first.log"))
        second, _ = stack.enter_context(serving(other, tmp_path / "second.log"))
        yield first, second, other
    for log in ("first.log", "second.log"):
        assert "Traceback" not in (tmp_path / log).read_text()


def spend_in(url: str, scope: str) -> tuple[int, int]:
    async def read() -> tuple[int, int]:
        async with opened(url, password=os.environ[PASSWORD_ENV]) as store:
            rows = await store.spend.spend([(scope, period_start("monthly", time.time()))])
        return (rows[0].spent, rows[0].reserved) if rows else (0, 0)

    return asyncio.run(read())


def test_a_budget_is_never_passed_across_two_processes(
    node_dir: NodeDir, postgres_url: str, tmp_path: Path
) -> None:
    priced_echo(node_dir)
    charged = 0
    rounds: list[int] = []
    with two_processes(node_dir, postgres_url, tmp_path) as (first, second, _):
        key, key_id = make_key(node_dir.path, name="small", budget_micros=CAP)

        async def wave() -> list[httpx.Response]:
            a, b = await asyncio.gather(fire(first, key, 150), fire(second, key, 150))
            return a + b

        # Waves of 300 concurrent requests, half to each process, until one gets nothing.
        while not rounds or rounds[-1]:
            responses = asyncio.run(wave())
            statuses = [r.status_code for r in responses]
            assert set(statuses) <= {200, 429}, statuses
            served = [r for r in responses if r.status_code == 200]
            charged += sum(int(r.headers["aihub-cost-micros"]) for r in served)
            rounds.append(len(served))
            assert len(rounds) < 50
    spent, reserved = spend_in(postgres_url, f"key:{key_id}")
    assert spent == charged <= CAP
    assert reserved == 0
    # Used up, not stranded: each process refuses once its own lease (`node/gateway/budgets.py`)
    # holds less than a request's worst case and the database has less than that left too.
    assert CAP - spent < 3 * WORST
    assert rounds[0] >= CAP // WORST and rounds[-1] == 0


def chat(url: str, key: str) -> int:
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    headers = {"authorization": f"Bearer {key}"}
    return httpx.post(
        url + "/v1/chat/completions", json=body, headers=headers, timeout=30
    ).status_code


async def revoke(folder: Path, key_id: str) -> None:
    admin = await Management.open(folder)
    try:
        await admin.revoke_key(key_id, "test")
    finally:
        await admin.close()


def test_a_key_created_or_revoked_on_one_is_honoured_on_the_other(
    node_dir: NodeDir, postgres_url: str, tmp_path: Path
) -> None:
    with two_processes(node_dir, postgres_url, tmp_path) as (first, second, other):
        for _ in range(3):
            # Made through the second host's folder, used at once on the first, and back.
            key, key_id = make_key(other, name="fresh")
            assert chat(first, key) == 200
            assert chat(second, key) == 200

            asyncio.run(revoke(other, key_id))
            assert chat(first, key) == 401
            assert chat(second, key) == 401


def test_one_pairs_chain_never_forks_or_gaps_when_both_issue_receipts(
    postgres_url: str, tmp_path: Path
) -> None:
    """Bob's node sends requests to both of alice's processes at once (signed for alice's
    address, as a load balancer in front of both would pass them on): every one is served
    with a receipt, and alice's chain for bob is one chain, every seq once, each linked to
    the one before, as `aihub ledger verify` checks."""
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    moved_to_postgres(alice.dir, postgres_url)
    authority = f"127.0.0.1:{alice.port}"
    with serving(alice.path, tmp_path / "first.log", alice.port) as (first, _):
        cli("join", invite(alice), "--data-dir", str(bob.path))
        key = _bobs_key_at_alice(bob.path)
        with serving(second_host(alice.dir, tmp_path), tmp_path / "second.log") as (second, _):

            async def burst() -> list[int]:
                async with concurrent_client(first, 40) as client:
                    answers = await asyncio.gather(
                        *(
                            client.post(
                                url + CHAT,
                                content=BODY,
                                headers={
                                    **signed(bob.path, first + CHAT, BODY, key),
                                    "host": authority,
                                },
                            )
                            for url in [first, second] * 20
                        )
                    )
                return [answer.status_code for answer in answers]

            assert asyncio.run(burst()) == [200] * 40

    async def chain() -> list[StoredReceipt]:
        async with opened(postgres_url, password=os.environ[PASSWORD_ENV]) as store:
            (pair,) = await store.ledger.receipt_pairs()
            return await store.ledger.receipts(*pair)

    receipts = asyncio.run(chain())
    assert [r.seq for r in receipts] == list(range(1, 41))
    for before, after in itertools.pairwise(receipts):
        assert msgspec.json.decode(after.body)["prev"] == body_hash(before.body)
    checks = msgspec.json.decode(cli("ledger", "verify", "--json", "--data-dir", str(alice.path)))
    assert checks and all(check["ok"] for check in checks), checks


def test_rpm_holds_across_two_hosts(node_dir: NodeDir, postgres_url: str, tmp_path: Path) -> None:
    with two_processes(node_dir, postgres_url, tmp_path) as (first, second, _):
        output = cli("keys", "create", "--name", "limited", "--rpm", "6", "--json",
                     "--data-dir", str(node_dir.path))  # fmt: skip
        key = msgspec.json.decode(output)["key"]
        statuses = [chat(url, key) for _ in range(6) for url in (first, second)]
    assert statuses.count(200) == 6, statuses
    assert statuses.count(429) == 6, statuses


def test_a_captured_request_is_refused_by_the_other_host_and_an_invite_is_used_once(
    postgres_url: str, tmp_path: Path
) -> None:
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    carol, dave = make_peer(tmp_path, "carol"), make_peer(tmp_path, "dave")
    moved_to_postgres(alice.dir, postgres_url)
    authority = f"127.0.0.1:{alice.port}"
    with serving(alice.path, tmp_path / "first.log", alice.port) as (first, _):
        cli("join", invite(alice), "--data-dir", str(bob.path))
        key = _bobs_key_at_alice(bob.path)
        with serving(second_host(alice.dir, tmp_path), tmp_path / "second.log") as (second, _):
            captured = signed(bob.path, first + CHAT, BODY, key)
            assert post_as(first, authority, CHAT, BODY, captured).status_code == 200
            assert is_replay(post_as(second, authority, CHAT, BODY, captured))
            # One use left of an invite, two joiners, one at each host at once: one joins.
            token = invite(alice, "--uses", "1")
            joins = [_join(carol.path, token), _join(dave.path, token)]

            async def both() -> list[int]:
                async with httpx.AsyncClient(timeout=30) as client:
                    answers = await asyncio.gather(
                        *(
                            client.post(
                                url + "/federation/join",
                                content=body,
                                headers={**headers, "host": authority},
                            )
                            for url, (body, headers, _) in zip((first, second), joins, strict=True)
                        )
                    )
                return sorted(answer.status_code for answer in answers)

            statuses = asyncio.run(both())
            assert statuses[0] == 200 and statuses[1] != 200, statuses


def test_a_killed_processs_budget_lease_comes_back_and_its_usage_is_kept(
    node_dir: NodeDir, postgres_url: str, tmp_path: Path
) -> None:
    """A process killed with SIGKILL while it holds a lease of a budget: the other process
    gives the lease back once it expires, nobody restarted; the killed process's completed
    request is in the books (written, or replayed from its journal when its host restarts)."""
    priced_echo(node_dir)
    moved_to_postgres(node_dir, postgres_url)
    other = second_host(node_dir, tmp_path)
    key, key_id = make_key(node_dir.path, name="small", budget_micros=CAP)
    scope = f"key:{key_id}"
    with serving(other, tmp_path / "second.log"):
        with serving(node_dir.path, tmp_path / "first.log") as (first, killed):
            assert chat(first, key) == 200
            assert spend_in(postgres_url, scope)[1] > 0  # its lease, reserved
            killed.kill()
            killed.wait(timeout=10)
        assert wait_for(lambda: spend_in(postgres_url, scope)[1] == 0, seconds=120)
        with serving(node_dir.path, tmp_path / "first.log"):  # its host back: journal replayed
            pass
    spent, reserved = spend_in(postgres_url, scope)
    assert reserved == 0 and 0 < spent <= WORST

    async def usage() -> int:
        async with opened(postgres_url, password=os.environ[PASSWORD_ENV]) as store:
            return len(await store.usage.usage_since(0))

    assert asyncio.run(usage()) == 1


def test_max_parallel_holds_across_two_hosts(
    node_dir: NodeDir, postgres_url: str, tmp_path: Path
) -> None:
    node_dir.set_config('provider = "echo"', 'provider = "echo"\nlatency_ms = 3000')
    with two_processes(node_dir, postgres_url, tmp_path) as (first, second, _):
        output = cli("keys", "create", "--name", "narrow", "--max-parallel", "2", "--json",
                     "--data-dir", str(node_dir.path))  # fmt: skip
        key = msgspec.json.decode(output)["key"]
        body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

        async def burst() -> list[int]:
            async with concurrent_client(first, 8) as client:
                answers = await asyncio.gather(
                    *(
                        client.post(
                            url + CHAT, json=body, headers={"authorization": f"Bearer {key}"}
                        )
                        for url in [first, second] * 3
                    )
                )
            return [answer.status_code for answer in answers]

        statuses = asyncio.run(burst())
    assert statuses.count(200) == 2, statuses
    assert statuses.count(429) == 4, statuses


@contextmanager
def two_workers(node: NodeDir, log: Path) -> Iterator[tuple[str, list[int]]]:
    """The node served by `aihub serve --workers 2` on its SQLite folder: its URL and its
    two workers' pids, once both listen."""
    port = free_port()
    with serve_process(node.path, port, log, "--workers", "2") as serve:
        yield f"http://127.0.0.1:{port}", listening_workers(serve, port, 2)


def test_a_killed_workers_budget_lease_comes_back_on_sqlite(
    node_dir: NodeDir, tmp_path: Path
) -> None:
    """The same on one host's SQLite file under `--workers`: the worker that answered killed
    while it holds a lease, the other gives it back, nobody restarted."""
    priced_echo(node_dir)
    key, key_id = make_key(node_dir.path, name="small", budget_micros=CAP)
    scope = f"key:{key_id}"
    with two_workers(node_dir, tmp_path / "serve.log") as (url, workers):
        port = int(url.rsplit(":", 1)[1])
        with httpx.Client(base_url=url) as client:
            headers = {"authorization": f"Bearer {key}"}
            answer = client.post(CHAT, json=TINY_CHAT, headers=headers)
            assert answer.status_code == 200
            (answered,) = [pid for pid in workers if client_sockets(pid, port)]
            assert spend_of(node_dir.path, scope)[1] > 0
            os.kill(answered, signal.SIGKILL)
        assert wait_for(lambda: spend_of(node_dir.path, scope)[1] == 0, seconds=120)
    spent, reserved = spend_of(node_dir.path, scope)
    assert reserved == 0 and 0 < spent <= WORST


# --- a change of keys, honoured by the other host on its very next request ---------------------


async def _listeners_cut(url: str) -> int:
    """Every process's connection that listens for changes, terminated by the server (as a
    network fault or a restart of a proxy would): how many there were."""
    db = await asyncpg.connect(url, password=os.environ[PASSWORD_ENV])
    try:
        rows = await db.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE query ILIKE 'LISTEN%' AND pid <> pg_backend_pid()"
        )
    finally:
        await db.close()
    return len(rows)


async def _churn(
    folder: Path,
    target: str,
    rounds: int,
    cut: Callable[[], Awaitable[int]] | None = None,
    connections: int = 1,
    before_closing: Callable[[], None] = lambda: None,
) -> list[str]:
    """`rounds` times: a key made through `folder` is used at once on `target`, then revoked
    through `folder`, and the very next request on `target` must be refused; what each
    change's wait said of processes that had not applied it. Over `connections` clients in
    turn, each request on the next one; `before_closing` runs while they are still open."""
    admin = await Management.open(folder)
    said: list[str] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(httpx.AsyncClient(base_url=target, timeout=30))
                for _ in range(connections)
            ]
            turns = itertools.cycle(clients)
            for round_ in range(rounds):
                if cut is not None:
                    await cut()
                created = await admin.create_key(KeyInput(name=f"churn-{round_}"), "test")
                said += created.unconfirmed
                headers = {"authorization": f"Bearer {created.key}"}
                answer = await next(turns).post(CHAT, json=TINY_CHAT, headers=headers)
                assert answer.status_code == 200, (round_, answer.text)
                if cut is not None:
                    await cut()
                said += (await admin.revoke_key(created.record.id, "test")).unconfirmed
                answer = await next(turns).post(CHAT, json=TINY_CHAT, headers=headers)
                assert answer.status_code == 401, (round_, answer.text)
            before_closing()
    finally:
        await admin.close()
    return said


TINY_CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_keys_changed_on_one_host_are_honoured_by_the_other_on_its_next_request(
    node_dir: NodeDir, postgres_url: str, tmp_path: Path
) -> None:
    """Many times over, with nothing waited for in the test: the change's own call returns
    once the other host applied it (`node/gateway/propagation.py`)."""
    with two_processes(node_dir, postgres_url, tmp_path) as (first, second, other):
        assert asyncio.run(_churn(other, first, 40)) == []
        assert asyncio.run(_churn(node_dir.path, second, 40)) == []


def test_keys_changed_are_honoured_when_the_other_host_missed_the_notification(
    node_dir: NodeDir, postgres_url: str, tmp_path: Path
) -> None:
    """The connection on which the other host hears of changes is cut before each change: it
    reloads on its heartbeat instead, and the change's call waits for that. (Before, such a
    host checked the next request against the keys as they were: a revoked key was served.)"""
    with two_processes(node_dir, postgres_url, tmp_path) as (first, _, other):
        said = asyncio.run(_churn(other, first, 4, lambda: _listeners_cut(postgres_url)))
    assert said == []


def test_a_host_that_does_not_confirm_a_change_is_named(
    node_dir: NodeDir, postgres_url: str, tmp_path: Path
) -> None:
    """A host stopped (SIGSTOP: alive, not answering) while a key is made elsewhere: the
    command still succeeds, after its bounded wait, and names that host's process; once the
    host runs again it serves the key."""
    with two_processes(node_dir, postgres_url, tmp_path) as (first, second, other):
        stopped = served_pid(other)
        os.kill(stopped, signal.SIGSTOP)
        try:
            result = CliRunner().invoke(
                main,
                ["keys", "create", "--name", "late", "--json", "--data-dir", str(node_dir.path)],
            )
            # The admin API of the first host says the same in its answer.
            answer = httpx.post(
                first + "/admin/keys",
                json={"name": "late-too"},
                headers={"authorization": f"Bearer {node_dir.key}"},
                timeout=30,
            )
        finally:
            os.kill(stopped, signal.SIGCONT)
        assert answer.status_code == 201, answer.text
        (named,) = answer.json()["unconfirmed"]
        assert f"process {stopped} on" in named, named
        assert result.exit_code == 0, result.output
        created = msgspec.json.decode(result.stdout)
        warning = " ".join(result.stderr.split())
        assert f"process {stopped} on" in warning and "has not confirmed" in warning, warning
        assert created["unconfirmed"] and "Traceback" not in result.output
        assert chat(first, created["key"]) == 200
        assert wait_for(lambda: chat(second, created["key"]) == 200)


def served_pid(folder: Path) -> int:
    """The process id `aihub serve` wrote into its data folder's `served.json`."""
    return int(msgspec.json.decode((folder / "served.json").read_bytes())["pid"])


def test_a_revoked_peer_is_refused_by_the_other_host_on_its_next_request(
    postgres_url: str, tmp_path: Path
) -> None:
    """`aihub peers revoke` on one of alice's hosts, the other host's notifications cut first:
    bob's very next request to the other host is refused (before, it was served from the
    keys that host held)."""
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    moved_to_postgres(alice.dir, postgres_url)
    authority = f"127.0.0.1:{alice.port}"
    with serving(alice.path, tmp_path / "first.log", alice.port) as (first, _):
        cli("join", invite(alice), "--data-dir", str(bob.path))
        key = _bobs_key_at_alice(bob.path)
        other = second_host(alice.dir, tmp_path)
        with serving(other, tmp_path / "second.log"):
            asyncio.run(_listeners_cut(postgres_url))
            # Served still: the first host reloaded what it may have missed while cut off.
            headers = signed(bob.path, first + CHAT, BODY, key)
            assert post_as(first, authority, CHAT, BODY, headers).status_code == 200
            result = CliRunner().invoke(main, ["peers", "revoke", "bob", "--data-dir", str(other)])
            assert result.exit_code == 0 and "Revoked bob" in result.output, result.output
            assert "has not confirmed" not in result.output
            refused = post_as(
                first, authority, CHAT, BODY, signed(bob.path, first + CHAT, BODY, key)
            )
            assert refused.status_code == 401, refused.text


def test_keys_changed_are_honoured_by_the_other_worker_on_sqlite(
    node_dir: NodeDir, tmp_path: Path
) -> None:
    """`--workers 2` on one SQLite data folder: each worker reads the folder's `keys.epoch`
    on every request, so the change's call has nobody to wait for. The requests go out on
    connections in turn, spread by the kernel over both workers (all on one: 2**-31)."""
    with two_workers(node_dir, tmp_path / "serve.log") as (url, workers):
        port = int(url.rsplit(":", 1)[1])
        held: dict[int, int] = {}

        async def churned() -> list[str]:
            def seen() -> None:
                held.update({pid: client_sockets(pid, port) for pid in workers})

            return await _churn(node_dir.path, url, 40, connections=32, before_closing=seen)

        assert asyncio.run(churned()) == []
        assert min(held.values()) >= 1, held  # both workers answered some
