"""A consumer under several workers learns of a peer's models in every worker at once: a
model `aihub join` has just said is available is served by whichever worker takes the next
request (it answered 404 for up to a second), and an advert a peer pushes, which reaches one
worker, is taken up by the others within a second (they waited for their own check of the
peer, 30 s by default)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import httpx

from tests.conftest import serve_process
from tests.procfs import client_sockets, listening_workers
from tests.test_advert_changes import peer_key_id
from tests.test_federation import LLAMA, MINI, cli, invite, make_peer, wait_for

CONNECTIONS = 32  # spread over two workers by the kernel: all on one has a chance of 2**-31
HI = [{"role": "user", "content": "hi"}]


def _statuses(clients: list[httpx.Client], model: str) -> list[int]:
    body = {"model": model, "messages": HI, "max_tokens": 3}
    return [c.post("/v1/chat/completions", json=body).status_code for c in clients]


def test_a_joined_peers_models_and_its_pushed_adverts_reach_every_worker(tmp_path: Path) -> None:
    alice = make_peer(tmp_path, "alice", LLAMA, MINI)
    bob = make_peer(tmp_path, "bob")
    bob.dir.set_config("health_interval = 1", "health_interval = 30")  # the default
    port = bob.port
    with (
        alice.run(),
        serve_process(bob.path, port, tmp_path / "bob.log", "--workers", "2") as serve,
        ExitStack() as stack,
    ):
        workers = listening_workers(serve, port, 2)
        auth = {"authorization": f"Bearer {bob.dir.key}"}
        clients = [
            stack.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=auth))
            for _ in range(CONNECTIONS)
        ]
        assert set(_statuses(clients, "echo")) == {200}  # every connection open
        assert min(client_sockets(pid, port) for pid in workers) >= 1  # on both workers

        key_id_args = ("--data-dir", str(alice.path))
        cli("join", invite(alice, "--models", "llama3"), "--data-dir", str(bob.path))
        assert _statuses(clients, "llama3") == [200] * CONNECTIONS  # at once, on every worker

        # Alice widens bob's key: her advert, pushed, lands on one of bob's workers.
        cli("keys", "update", peer_key_id(str(alice.path), "bob"), "--models", "none", *key_id_args)
        assert wait_for(lambda: set(_statuses(clients, "gpt-4o-mini")) == {200}, seconds=10)
