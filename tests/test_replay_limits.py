"""Replay refusal and rate limits hold across restarts and across every process of a node.

Real `aihub serve` processes. "Another process of the node" is the other worker of
`aihub serve --workers 2`, reached on a connection the kernel gave it; the attacker is a
script with the captured bytes, or with a stolen cross-node key and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import msgspec

from federation.descriptors import make_descriptor
from federation.httpsig import sign_request
from federation.identity import NodeIdentity
from federation.ids import new_request_id
from federation.invites import make_join_request, parse_invite
from federation.sealing import unseal
from node.config import DATABASE_FILE, IDENTITY_FILE
from tests.conftest import wait_ready
from tests.procfs import worker_clients
from tests.test_federation import (
    HI,
    LLAMA,
    _bobs_key_at_alice,
    cli,
    invite,
    make_peer,
    wait_for,
)

CHAT = "/v1/chat/completions"
BODY = msgspec.json.encode({"model": "llama3", "messages": HI, "max_tokens": 2})


@contextmanager
def serving(path: Path, port: int, log: Path) -> Iterator[str]:
    """`aihub serve` on `path`, until the block ends; its base URL."""
    with serving_process(path, port, log) as (url, _):
        yield url


@contextmanager
def serving_process(
    path: Path, port: int, log: Path, *args: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`serving`, with the process itself (to kill it); `args` after the port."""
    command = [sys.executable, "-m", "node.cli", "serve", "--port", str(port), *args]
    process = subprocess.Popen(
        [*command, "--data-dir", str(path)],
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


def signed(path: Path, url: str, body: bytes, key: str | None = None) -> dict[str, str]:
    """Headers of a request signed by the node in `path` (with a cross-node key, if given)."""
    identity = NodeIdentity.load(path / IDENTITY_FILE)
    headers = {"content-type": "application/json", "aihub-request-id": new_request_id()}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    return headers | sign_request(identity, "POST", url, headers, body)


def post_as(url: str, authority: str, path: str, body: bytes, headers: dict[str, str]):  # type: ignore[no-untyped-def]
    """POST to `url` as if to `authority` (what the request was signed for)."""
    return httpx.post(url + path, content=body, headers={**headers, "host": authority}, timeout=30)


def is_replay(response: httpx.Response) -> bool:
    error = response.json().get("error", {})
    return response.status_code in (401, 403) and "already used" in error.get("message", "")


def _joined(tmp_path: Path):  # type: ignore[no-untyped-def]
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    return alice, bob, f"127.0.0.1:{alice.port}", tmp_path / "alice.log"


def _post(client: httpx.Client, authority: str, headers: dict[str, str]) -> httpx.Response:
    """POST the chat on `client`'s connection, as if to `authority` (what it was signed for)."""
    return client.post(CHAT, content=BODY, headers={**headers, "host": authority})


def test_a_captured_request_is_refused_by_another_process_of_the_node(tmp_path):
    alice, bob, authority, log = _joined(tmp_path)
    with (
        serving_process(alice.path, alice.port, log, "--workers", "2") as (url, serve),
        ExitStack() as stack,
    ):
        cli("join", invite(alice), "--data-dir", str(bob.path))
        key = _bobs_key_at_alice(bob.path)
        [one], [other] = worker_clients(stack, url, serve, alice.port).values()
        captured = signed(bob.path, url + CHAT, BODY, key)
        assert _post(one, authority, captured).status_code == 200
        assert is_replay(_post(one, authority, captured))
        # The other worker serves bob's fresh requests…
        assert _post(other, authority, signed(bob.path, url + CHAT, BODY, key)).status_code == 200
        # …and refuses the captured one, which it has never seen itself.
        assert is_replay(_post(other, authority, captured))


def test_a_captured_request_is_refused_after_a_restart(tmp_path):
    alice, bob, authority, log = _joined(tmp_path)
    with serving(alice.path, alice.port, log) as url:
        cli("join", invite(alice), "--data-dir", str(bob.path))
        key = _bobs_key_at_alice(bob.path)
        captured = signed(bob.path, url + CHAT, BODY, key)
        assert post_as(url, authority, CHAT, BODY, captured).status_code == 200
    with serving(alice.path, alice.port, log) as url:  # restarted: nothing in memory
        assert is_replay(post_as(url, authority, CHAT, BODY, captured))
        fresh = signed(bob.path, url + CHAT, BODY, key)
        assert post_as(url, authority, CHAT, BODY, fresh).status_code == 200


def _join(bob: Path, token: str) -> tuple[bytes, dict[str, str], str]:
    """Bob's join request as his node would send it: body, signed headers, and the URL."""
    identity = NodeIdentity.load(bob / IDENTITY_FILE)
    invite_ = parse_invite(token)
    descriptor = make_descriptor(identity, "bob", ["http://127.0.0.1:9/"])
    body = msgspec.json.encode(make_join_request(invite_, identity, descriptor))
    url = invite_.urls[0].rstrip("/") + "/federation/join"
    return body, signed(bob, url, body), url


def _works(bob: Path, url: str, authority: str, key: str) -> bool:
    response = post_as(url, authority, CHAT, BODY, signed(bob, url + CHAT, BODY, key))
    return response.status_code == 200


def _first_join(bob: Path, alice_) -> tuple[bytes, dict[str, str], str, str]:  # type: ignore[no-untyped-def]
    """Bob joins alice on an invite of two uses (so that only the replay check stands
    between a replay and a second join); what he sent, and the key he got."""
    body, headers, join_url = _join(bob, invite(alice_, "--uses", "2"))
    joined = httpx.post(join_url, content=body, headers=headers, timeout=30)
    assert joined.status_code == 200, joined.text
    bob_identity = NodeIdentity.load(bob / IDENTITY_FILE)
    key = unseal(bob_identity, joined.json()["sealed_key"]).decode()
    return body, headers, join_url, key


def test_a_join_proof_is_refused_a_second_time_and_the_joiners_key_keeps_working(tmp_path):
    alice, bob, authority, log = _joined(tmp_path)
    with serving(alice.path, alice.port, log) as url:
        body, _, join_url, key = _first_join(bob.path, alice)
        assert _works(bob.path, url, authority, key)
        # The same join proof under a new request signature: nothing about a proof may be
        # used twice, whatever carries it.
        again = httpx.post(join_url, content=body, headers=signed(bob.path, join_url, body))
        assert again.status_code == 403 and is_replay(again), again.text
        assert _works(bob.path, url, authority, key)


def test_a_replayed_join_is_refused_after_a_restart_and_the_joiners_key_keeps_working(tmp_path):
    alice, bob, authority, log = _joined(tmp_path)
    with serving(alice.path, alice.port, log) as url:
        body, headers, join_url, key = _first_join(bob.path, alice)
    with serving(alice.path, alice.port, log) as url:  # restarted: nothing in memory
        replayed = httpx.post(join_url, content=body, headers=headers, timeout=30)
        assert is_replay(replayed), replayed.text
        assert _works(bob.path, url, authority, key)


def test_a_stolen_cross_node_key_alone_does_not_list_the_models(tmp_path):
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    with serving(alice.path, alice.port, tmp_path / "alice.log") as url:
        cli("join", invite(alice), "--data-dir", str(bob.path))
        stolen = {"authorization": f"Bearer {_bobs_key_at_alice(bob.path)}"}
        for path in ("/v1/models", "/v1/models/llama3"):
            response = httpx.get(url + path, headers=stolen)
            assert response.status_code == 401, (path, response.text)
            assert response.json()["error"]["code"] == "bad_signature"
            assert "llama3" not in response.text
        # With bob's signature the same key lists them.
        identity = NodeIdentity.load(bob.path / IDENTITY_FILE)
        headers = {**stolen, "aihub-request-id": new_request_id()}
        headers |= sign_request(identity, "GET", url + "/v1/models", headers, b"")
        listed = httpx.get(url + "/v1/models", headers=headers)
        assert listed.status_code == 200 and "llama3" in listed.text


def _limited_key(node: Path, *limits: str) -> str:
    output = cli("keys", "create", "--name", "limited", *limits, "--json", "--data-dir", str(node))
    return msgspec.json.decode(output)["key"]


def test_rpm_holds_across_two_processes_of_one_node(tmp_path):
    alice = make_peer(tmp_path, "alice", LLAMA)
    key = _limited_key(alice.path, "--rpm", "6")
    log = tmp_path / "alice.log"
    chat = {"model": "llama3", "messages": HI, "max_tokens": 2}
    auth = {"authorization": f"Bearer {key}"}
    with (
        serving_process(alice.path, alice.port, log, "--workers", "2") as (url, serve),
        ExitStack() as stack,
    ):
        [one], [two] = worker_clients(stack, url, serve, alice.port).values()
        statuses = [
            client.post(CHAT, json=chat, headers=auth).status_code
            for _ in range(6)
            for client in (one, two)
        ]
    assert statuses.count(200) == 6, statuses
    assert statuses.count(429) == 6, statuses


def test_max_parallel_holds_across_two_processes_and_a_dead_ones_slots_come_back(tmp_path):
    alice = make_peer(tmp_path, "alice")
    alice.dir.set_config('provider = "echo"', 'provider = "echo"\nlatency_ms = 3000')
    alice.dir.add_config('[[models]]\nname = "slow"\nprovider = "echo"\nlatency_ms = 30000')
    key = _limited_key(alice.path, "--max-parallel", "2")
    log = tmp_path / "alice.log"
    chat = {"model": "echo", "messages": HI, "max_tokens": 2}
    auth = {"authorization": f"Bearer {key}"}

    def burst(clients: list[httpx.Client]) -> list[int]:
        with ThreadPoolExecutor(len(clients)) as pool:
            answers = pool.map(lambda c: c.post(CHAT, json=chat, headers=auth), clients)
            return [answer.status_code for answer in answers]

    with (
        serving_process(alice.path, alice.port, log, "--workers", "2") as (url, serve),
        ExitStack() as stack,
    ):
        (first, ones), (_, twos) = worker_clients(stack, url, serve, alice.port, each=3).items()
        # Three at once to each worker: two in flight in all, whichever worker has them.
        statuses = burst(ones + twos)
        assert statuses.count(200) == 2, statuses
        assert statuses.count(429) == 4, statuses

        # A worker killed while it holds both slots: they come back when their lease
        # expires, without anyone's help.
        slow = {**chat, "model": "slow"}

        def hold(client: httpx.Client) -> None:  # a slot of the first worker, until it dies
            with contextlib.suppress(httpx.HTTPError):  # it does die
                # Refused while the other worker has not yet given back its idle slot.
                status = 429
                while status == 429:
                    status = client.post(CHAT, json=slow, headers=auth).status_code

        holders = [threading.Thread(target=hold, args=(client,)) for client in ones[:2]]
        for holder in holders:
            holder.start()
        assert wait_for(lambda: _slots_held(alice.path) == 2, seconds=30)
        os.kill(first, signal.SIGKILL)
        for holder in holders:
            holder.join(timeout=30)
        assert wait_for(
            lambda: twos[0].post(CHAT, json=chat, headers=auth).status_code == 200, seconds=60
        )


def _slots_held(path: Path) -> int:
    """Parallel slots the node's processes hold in its store, unexpired."""
    with contextlib.closing(sqlite3.connect(path / DATABASE_FILE)) as db:
        row = db.execute(
            "SELECT COALESCE(SUM(slots), 0) FROM parallel_slots WHERE expires >= ?",
            (int(time.time()),),
        ).fetchone()
    return int(row[0])
