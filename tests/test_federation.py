"""Three real nodes on loopback ports, talking real HTTP: invites and joins, adverts, routed
requests through the official `openai` SDK (plain and streaming), failover from a dead peer
to a live one, revocation, and refusals of forged or replayed peer requests."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import msgspec
import openai
import pytest
from click.testing import CliRunner

from federation.invites import parse_invite
from node.cli.main import main
from node.config import DATABASE_FILE
from node.provision import create_node
from node.storage import open_store
from tests.conftest import NodeDir, RunningNode, run_node
from tests.mocks.server import free_socket

LLAMA = (
    '[[models]]\nname = "llama3"\nprovider = "echo"\nprice_in = 1_000_000\nprice_out = 1_000_000'
)
MINI = '[[models]]\nname = "gpt-4o-mini"\nprovider = "echo"'


class Peer:
    """A node's folder and the loopback port its invites name. The port stays bound (not
    listening) from the moment it is picked until the node is first served on it: a port
    merely found free could be taken in between by another test's server (EADDRINUSE)."""

    def __init__(self, directory: NodeDir, reserved: socket.socket) -> None:
        self.dir = directory
        self.port: int = reserved.getsockname()[1]
        self._reserved: socket.socket | None = reserved

    @property
    def path(self) -> Path:
        return self.dir.path

    def run(self):  # type: ignore[no-untyped-def]
        sock, self._reserved = self._reserved, None  # served once; a restart binds anew
        return run_node(self.dir, port=self.port, sock=sock)

    def release(self) -> None:
        """Let the port go, for a node served by another process to bind it."""
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None


def make_peer(tmp_path: Path, name: str, *models: str) -> Peer:
    _, key = create_node(tmp_path / name, name)
    directory = NodeDir(tmp_path / name, key)
    peer = Peer(directory, free_socket())
    directory.set_config("public_urls = []", f'public_urls = ["http://127.0.0.1:{peer.port}"]')
    directory.set_config("health_interval = 30", "health_interval = 1")
    for model in models:
        directory.add_config(model)
    return peer


def cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def invite(issuer: Peer, *extra: str) -> str:
    """The token alone (stdout): its warnings (a loopback address here) go to stderr."""
    args = ["invite", "create", "--data-dir", str(issuer.path), *extra]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def wait_for(predicate: Callable[[], bool], seconds: float = 30.0) -> bool:
    # A deadline only a broken node reaches: on a loaded 2-core machine one poll that runs the
    # CLI (`ledger export`) took seconds, and 10 s was seen to run out in a passing test.
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def model_owners(node: RunningNode) -> dict[str, str]:
    with node.client() as client:
        return {m["id"]: m["owned_by"] for m in client.get("/v1/models").json()["data"]}


def sdk(node: RunningNode) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key=node.key, max_retries=0)


def usage_rows(path: Path) -> list:
    async def read() -> list:
        store = await open_store(path / DATABASE_FILE)
        try:
            return await store.usage.usage_since(0)
        finally:
            await store.close()

    return asyncio.run(read())


HI = [{"role": "user", "content": "hi there"}]


def answers(node: RunningNode, model: str, **fields: object) -> bool:
    with node.client() as client:
        body = {"model": model, "messages": HI, **fields}
        return client.post("/v1/chat/completions", json=body).status_code == 200


def test_invite_join_route_stream_failover_and_revoke(tmp_path):
    alice = make_peer(tmp_path, "alice", LLAMA, MINI)
    bob = make_peer(tmp_path, "bob")
    carol = make_peer(tmp_path, "carol", LLAMA)
    with alice.run(), carol.run(), bob.run() as b:
        token = invite(alice, "--models", "llama3*", "--cap", "1", "--uses", "1")
        assert token.startswith("aihub1.")
        cli("join", token, "--data-dir", str(bob.path))
        # The token was for one use only.
        refused = CliRunner().invoke(main, ["join", token, "--data-dir", str(carol.path)])
        assert refused.exit_code != 0 and "used up" in refused.output
        assert '{"error"' not in refused.output  # the node's message, not its JSON
        # Cut short, as a copy and paste can: said so, and what to do.
        cut = CliRunner().invoke(main, ["join", token[:-7], "--data-dir", str(carol.path)])
        assert cut.exit_code == 1 and "copy the whole token" in " ".join(cut.output.split())

        # Within seconds bob lists alice's shared model, and only that one.
        assert wait_for(lambda: model_owners(b).get("llama3") == "alice")
        assert "gpt-4o-mini" not in model_owners(b)

        reply = sdk(b).chat.completions.create(model="llama3", messages=HI)
        assert reply.choices[0].message.content == "echo: hi there"
        stream = sdk(b).chat.completions.create(model="llama3", messages=HI, stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert text == "echo: hi there"
        pinned = sdk(b).chat.completions.create(model="llama3@alice", messages=HI)
        assert pinned.choices[0].message.content == "echo: hi there"

        # Alice served them under bob's cross-node key; bob recorded the peer hop.
        assert wait_for(
            lambda: len([r for r in usage_rows(alice.path) if r.model == "llama3"]) == 3
        )
        served = [r for r in usage_rows(alice.path) if r.model == "llama3"]
        assert all(r.status == 200 and r.cost_micros > 0 for r in served)
        assert len({r.key_id for r in served}) == 1
        assert wait_for(lambda: any(r.deployment == "llama3@alice" for r in usage_rows(bob.path)))

        # Bob also joins carol, who serves llama3 too.
        cli("join", invite(carol), "--data-dir", str(bob.path))
        assert wait_for(lambda: answers(b, "llama3@carol"))

        # Alice revokes bob: her side refuses bob's key at once.
        cli("peers", "revoke", "bob", "--data-dir", str(alice.path))
        with pytest.raises(openai.APIStatusError):
            sdk(b).chat.completions.create(model="llama3@alice", messages=HI)
        # Unpinned, bob's request fails over to carol.
        assert wait_for(lambda: "llama3" in model_owners(b))
        reply = sdk(b).chat.completions.create(model="llama3", messages=HI)
        assert reply.choices[0].message.content == "echo: hi there"
    listed = cli("peers", "list", "--all", "--data-dir", str(alice.path))
    assert "bob" in listed and "revoked" in listed


def test_failover_from_a_dead_peer_to_a_live_one(tmp_path):
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    carol = make_peer(tmp_path, "carol", LLAMA)
    with carol.run(), bob.run() as b:
        with alice.run():
            cli("join", invite(alice), "--data-dir", str(bob.path))
            cli("join", invite(carol), "--data-dir", str(bob.path))
            # Both peers routed, not only the first whose advert arrived: once alice is gone,
            # carol must already be a route for the requests below to fail over to.
            assert wait_for(lambda: answers(b, "llama3@alice") and answers(b, "llama3@carol"))
            stream = sdk(b).chat.completions.create(model="llama3", messages=HI, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        # Alice is gone: plain and streamed requests still succeed, through carol.
        for _ in range(3):
            reply = sdk(b).chat.completions.create(model="llama3", messages=HI)
            assert reply.choices[0].message.content == "echo: hi there"
        stream = sdk(b).chat.completions.create(model="llama3", messages=HI, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    served_by_carol = [r for r in usage_rows(carol.path) if r.model == "llama3"]
    assert len(served_by_carol) >= 4


def test_peer_requests_must_be_signed_by_the_pinned_node(tmp_path):
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    with alice.run() as a, bob.run():
        cli("join", invite(alice), "--data-dir", str(bob.path))
        peer_key = _bobs_key_at_alice(bob.path)
        body = msgspec.json.encode({"model": "llama3", "messages": HI})
        # The cross-node key alone is refused: it needs bob's signature.
        bare = httpx.post(
            a.url + "/v1/chat/completions",
            content=body,
            headers={"authorization": f"Bearer {peer_key}", "content-type": "application/json"},
        )
        assert bare.status_code == 401 and bare.json()["error"]["code"] == "bad_signature"
        # A signed request works once; the same bytes again are a replay.
        headers = _signed_by(bob.path, a.url + "/v1/chat/completions", body, peer_key)
        first = httpx.post(a.url + "/v1/chat/completions", content=body, headers=headers)
        again = httpx.post(a.url + "/v1/chat/completions", content=body, headers=headers)
        assert first.status_code == 200
        assert again.status_code == 401 and "replay" in again.json()["error"]["message"].lower()
        # Signed by another node (carol's key) for bob's key id: refused.
        carol = make_peer(tmp_path, "carol")
        forged = _signed_by(carol.path, a.url + "/v1/chat/completions", body, peer_key)
        response = httpx.post(a.url + "/v1/chat/completions", content=body, headers=forged)
        assert response.status_code == 401


def _bobs_key_at_alice(bob_path: Path) -> str:
    from federation.identity import NodeIdentity
    from federation.sealing import unseal
    from node.config import IDENTITY_FILE

    async def read() -> str:
        store = await open_store(bob_path / DATABASE_FILE)
        try:
            (peer,) = await store.peers.peers()
            assert peer.key_from_them
            return unseal(NodeIdentity.load(bob_path / IDENTITY_FILE), peer.key_from_them).decode()
        finally:
            await store.close()

    return asyncio.run(read())


def _signed_by(path: Path, url: str, body: bytes, key: str) -> dict[str, str]:
    from federation.httpsig import sign_request
    from federation.identity import NodeIdentity
    from federation.ids import new_request_id
    from node.config import IDENTITY_FILE

    identity = NodeIdentity.load(path / IDENTITY_FILE)
    headers = {
        "authorization": f"Bearer {key}",
        "content-type": "application/json",
        "aihub-request-id": new_request_id(),
    }
    headers.update(sign_request(identity, "POST", url, headers, body))
    return headers


def test_join_by_approved_request_and_adverts_pushed_when_models_change(tmp_path):
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    carol = make_peer(tmp_path, "carol", LLAMA)
    with carol.run(), bob.run() as b:
        with alice.run() as a:
            # Bob asks alice (pinning her node id) without an invite: nothing is granted yet.
            seed = f"{alice_id(alice)}@{a.url}"
            assert "waiting" in cli("peers", "request", seed, "--data-dir", str(bob.path))
            assert not answers(b, "llama3")
            pending = msgspec.json.decode(
                cli("peers", "pending", "--json", "--data-dir", str(alice.path))
            )
            assert [entry[0]["name"] for entry in pending] == ["bob"]
            # A pin that does not match the node is refused before anything is sent.
            wrong = f"{alice_id(carol)}@{a.url}"
            refused = CliRunner().invoke(
                main, ["peers", "request", wrong, "--data-dir", str(bob.path)]
            )
            assert refused.exit_code == 1 and "pinned" in refused.output

            cli(
                "peers",
                "approve",
                "bob",
                "--models",
                "llama3",
                "--cap",
                "1",
                "--data-dir",
                str(alice.path),
            )
            # Bob's running node asks again by itself, joins, fetches the advert and routes.
            assert wait_for(lambda: answers(b, "llama3@alice"))
            assert model_owners(b)["llama3"] == "alice"
            assert (
                msgspec.json.decode(
                    cli("peers", "pending", "--json", "--data-dir", str(alice.path))
                )
                == []
            )
            listed = msgspec.json.decode(
                cli("peers", "list", "--json", "--data-dir", str(bob.path))
            )
            assert [(p["name"], p["status"], p["models"]) for p in listed] == [
                ("alice", "active", ["llama3"])
            ]

            # Bob's scheduled health checks record alice as up, with a latency.
            def alice_health() -> tuple:
                (peer,) = msgspec.json.decode(
                    cli("peers", "list", "--json", "--data-dir", str(bob.path))
                )
                return peer["healthy"], peer["latency_ms"] is not None

            assert wait_for(lambda: alice_health() == (True, True))

        # Alice restarts with a new model (and new advert seq) and pushes her advert to bob at
        # once, restricted to what bob's key may use: the invite-less key allows llama3 only.
        alice.dir.add_config(MINI)
        with alice.run():
            assert wait_for(lambda: answers(b, "llama3@alice"))
            assert "gpt-4o-mini" not in model_owners(b)


def test_push_of_a_new_model_reaches_peers_without_waiting_for_a_refresh(tmp_path):
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    # Bob's scheduled refresh is far away: only alice's push can tell him in time.
    bob.dir.set_config("health_interval = 1", "health_interval = 3600")
    with bob.run() as b:
        with alice.run():
            cli("join", invite(alice), "--data-dir", str(bob.path))
            assert wait_for(lambda: answers(b, "llama3"))
            assert not answers(b, "gpt-4o-mini")
        alice.dir.add_config(MINI)
        with alice.run():
            assert wait_for(lambda: answers(b, "gpt-4o-mini"))
            assert model_owners(b)["gpt-4o-mini"] == "alice"


def test_a_peer_request_is_never_forwarded_and_the_peer_cap_holds(tmp_path):
    alice = make_peer(tmp_path, "alice")
    bob = make_peer(tmp_path, "bob")
    carol = make_peer(tmp_path, "carol", LLAMA)
    with alice.run() as a, bob.run() as b, carol.run():
        # Bob gets llama3 from carol; alice is bob's peer (bob shares everything with her).
        cli("join", invite(carol, "--cap", "0.0002"), "--data-dir", str(bob.path))
        cli("join", invite(bob), "--data-dir", str(alice.path))
        assert wait_for(lambda: answers(b, "llama3", max_tokens=5))
        # Bob serves alice from his own deployments only: carol's llama3 is not resold.
        assert wait_for(lambda: alice_has_bob(alice.path) and "echo" in model_owners(a))
        assert "llama3" not in model_owners(a)
        response = a.client().post("/v1/chat/completions", json={"model": "llama3", "messages": HI})
        assert response.status_code == 404
        # Carol's cap for bob ($0.0002 at $1 per 1M tokens each way) runs out, and holds.
        statuses = [
            b.client()
            .post("/v1/chat/completions", json={"model": "llama3", "messages": HI, "max_tokens": 5})
            .status_code
            for _ in range(25)
        ]
        assert statuses[0] == 200 and statuses[-1] == 429
        spent = [r.cost_micros for r in usage_rows(carol.path) if r.status == 200]
        assert 0 < sum(spent) <= 200


def test_bad_input_from_peers_changes_nothing(tmp_path):
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    with alice.run() as a, bob.run():
        token = invite(alice, "--expires", "1s")
        # Once the clock is past the token's expiry (a time, not an event to wait for):
        exp = parse_invite(token).exp
        assert wait_for(lambda: time.time() > exp + 1)
        expired = CliRunner().invoke(main, ["join", token, "--data-dir", str(bob.path)])
        assert expired.exit_code == 1 and "expired" in expired.output
        # Garbage, unsigned or oversized bodies on every federation endpoint: 4xx, never 500.
        for path in ("/federation/join", "/federation/join-request", "/federation/advert"):
            for body in (b"", b"{}", b"\xff\xfe", b"[1,2", b"x" * 70_000):
                response = httpx.post(a.url + path, content=body)
                assert 400 <= response.status_code < 500, (path, body[:10], response.text)
                assert "error" in response.json()
        for path in ("/federation/advert", "/federation/peers"):
            assert httpx.get(a.url + path).status_code == 401
        # A signed body that is not a join request; a join request signed by someone else.
        body = b'{"v": 1}'
        url = a.url + "/federation/join"
        assert (
            httpx.post(url, content=body, headers=_signed_by(bob.path, url, body, "x")).status_code
            == 400
        )
        # An advert pushed by a node that is not alice's peer is refused.
        url = a.url + "/federation/advert"
        advert = b'{"v": 1, "node_id": "x"}'
        pushed = httpx.post(url, content=advert, headers=_signed_by(bob.path, url, advert, "x"))
        assert pushed.status_code == 401
    assert peers_of(alice.path) == []
    assert peers_of(bob.path) == []


def alice_id(peer: Peer) -> str:
    from federation.identity import NodeIdentity
    from node.config import IDENTITY_FILE

    return NodeIdentity.load(peer.path / IDENTITY_FILE).node_id


def peers_of(path: Path) -> list:
    async def read() -> list:
        store = await open_store(path / DATABASE_FILE)
        try:
            return await store.peers.peers(include_revoked=True)
        finally:
            await store.close()

    return asyncio.run(read())


def alice_has_bob(path: Path) -> bool:
    return any(p.name == "bob" for p in peers_of(path))


def test_a_join_to_a_node_that_does_not_answer_says_what_to_check(tmp_path):
    alice = make_peer(tmp_path, "alice", LLAMA)  # never served: nothing listens on its port
    bob = make_peer(tmp_path, "bob")
    result = CliRunner().invoke(main, ["join", invite(alice), "--data-dir", str(bob.path)])
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in said
    assert f"could not reach the inviting node at http://127.0.0.1:{alice.port}" in said
    assert "is it running" in said and "public_urls" in said
