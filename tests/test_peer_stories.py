"""Federation as a new user meets it, on real nodes over real HTTP: invites that carry the
address the node really serves on, joins that say what they got, peers' models as
`model@peer`, answers that say which peer served them, revocation told to the revoked side
(and not to be faked by a third party), a peer's cap refusal not retried, `peers list` that a
person can read, and the audit log of federation actions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anthropic
import httpx
import msgspec
import openai
import pytest
from click.testing import CliRunner

from federation.identity import NodeIdentity
from federation.invites import parse_invite
from federation.revocations import NOTICE_PATH, make_revocation
from node.cli.main import main
from node.config import DATABASE_FILE, IDENTITY_FILE
from node.peers.address import running_url
from node.peers.peering import signed_request
from node.provision import create_node
from node.storage import open_store
from tests.conftest import NodeDir, serve_process
from tests.mocks.server import free_port, serve_app
from tests.test_federation import (
    HI,
    LLAMA,
    MINI,
    Peer,
    cli,
    invite,
    make_peer,
    model_owners,
    sdk,
    wait_for,
)


def run(*args: str) -> tuple[int, str, str]:
    """`aihub ARGS` in this process: (exit code, stdout, stderr)."""
    result = CliRunner().invoke(main, list(args))
    # Rich wraps long lines: compare words, not line breaks.
    return result.exit_code, result.stdout, " ".join(result.stderr.split())


def audit_actions(path: Path) -> list[tuple[str, str | None]]:
    async def read() -> list[tuple[str, str | None]]:
        store = await open_store(path / DATABASE_FILE)
        try:
            return [(e.action, e.target) for e in await store.audit.audit(limit=1000)]
        finally:
            await store.close()

    return asyncio.run(read())


def node_id(peer: Peer) -> str:
    return NodeIdentity.load(peer.path / IDENTITY_FILE).node_id


def peer_statuses(peer: Peer) -> dict[str, str]:
    listed = msgspec.json.decode(
        cli("peers", "list", "--all", "--json", "--data-dir", str(peer.path))
    )
    return {row["name"]: row["status"] for row in listed}


@contextmanager
def served(directory: NodeDir, port: int, log: Path) -> Iterator[str]:
    """A real `aihub serve --port PORT` (not the config's port) in its own process."""
    with serve_process(directory.path, port, log):
        yield f"http://127.0.0.1:{port}"


def test_an_invite_carries_the_address_the_node_serves_on_and_join_says_what_it_got(tmp_path):
    _, key = create_node(tmp_path / "alice", "alice")
    alice = NodeDir(tmp_path / "alice", key)
    alice.add_config(LLAMA)
    bob = make_peer(tmp_path, "bob")
    carol = make_peer(tmp_path, "carol")
    port = free_port()  # not the config's 8787, and no public_urls
    with served(alice, port, tmp_path / "alice.log") as url, bob.run() as b, carol.run():
        code, token, warned = run(
            "invite", "create", "--models", "llama3*", "--data-dir", str(alice.path)
        )
        assert code == 0 and parse_invite(token.strip()).urls == [url]
        # Only this machine can reach a loopback address: the admin is told how to fix it.
        assert "loopback" in warned and "public_urls" in warned
        code, out, _ = run("join", token.strip(), "--data-dir", str(bob.path))
        assert code == 0 and "llama3" in out and "shares no models" not in out
        assert wait_for(lambda: model_owners(b).get("llama3@alice") == "alice")

        # A pattern that matches none of alice's models is warned of; a join by it says so.
        code, token, warned = run(
            "invite", "create", "--models", "gpt-5*", "--data-dir", str(alice.path)
        )
        assert (
            code == 0
            and "'gpt-5*' matches none of this node's models (echo, echo-embed, llama3)" in warned
        )
        code, out, _ = run("join", token.strip(), "--data-dir", str(carol.path))
        assert code == 0 and "shares no models" in out
    # The address recorded goes with the process that served it (uvicorn ends on SIGTERM by
    # re-raising it, so the file may stay: its process id says it is stale).
    assert running_url(alice.path) is None
    issuer = [action for action, _ in audit_actions(alice.path)]
    assert issuer.count("invite.create") == 2
    assert ("peer.joined", node_id(bob)) in audit_actions(alice.path)
    assert ("peer.join", NodeIdentity.load(alice.path / IDENTITY_FILE).node_id) in audit_actions(
        bob.path
    )


def test_peers_models_are_listed_as_model_at_peer_and_answers_say_who_served_them(tmp_path):
    alice = make_peer(tmp_path, "alice", LLAMA, MINI)
    # Bob has a llama3 of his own: alice's is reachable (and listed) as llama3@alice.
    bob = make_peer(tmp_path, "bob", LLAMA.replace("1_000_000", "0"))
    with alice.run(), bob.run() as b:
        cli("join", invite(alice), "--data-dir", str(bob.path))
        assert wait_for(lambda: "llama3@alice" in model_owners(b))
        owners = {model.id: model.owned_by for model in sdk(b).models.list()}
        assert owners["llama3"] == "bob"
        assert owners["llama3@alice"] == "alice"
        assert owners["gpt-4o-mini"] == "alice" and owners["gpt-4o-mini@alice"] == "alice"
        assert sdk(b).models.retrieve("llama3@alice").owned_by == "alice"
        listed = (
            CliRunner()
            .invoke(main, ["models", "--data-dir", str(bob.path)], env={"COLUMNS": "200"})
            .stdout
        )
        rows = {line.split("│")[1].strip(): line for line in listed.splitlines() if "│" in line}
        assert "peer alice" in rows["llama3@alice"] and "peer alice" in rows["gpt-4o-mini"]
        assert "peer" not in rows["llama3"]  # bob's own

        # Bob's own llama3 answers as his: no served-by header.
        local = sdk(b).chat.completions.with_raw_response.create(model="llama3", messages=HI)
        assert "aihub-served-by" not in local.headers

        # Alice's, plain and streamed: named, and the id is bob's request id.
        raw = sdk(b).chat.completions.with_raw_response.create(model="llama3@alice", messages=HI)
        assert raw.headers["aihub-served-by"] == "alice"
        assert raw.parse().id == raw.headers["aihub-request-id"]
        assert raw.parse().choices[0].message.content == "echo: hi there"
        with sdk(b).chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=HI, stream=True
        ) as streamed:
            assert streamed.headers["aihub-served-by"] == "alice"
            ids = {chunk.id for chunk in streamed.parse()}
            assert ids == {streamed.headers["aihub-request-id"]}

        # The Responses and Messages surfaces: the same header, their ids made of bob's.
        responses = sdk(b).responses.with_raw_response.create(model="llama3@alice", input="hi")
        request_id = responses.headers["aihub-request-id"]
        assert responses.headers["aihub-served-by"] == "alice"
        assert responses.parse().id.removeprefix("resp_") == request_id.removeprefix("req_")
        claude = anthropic.Anthropic(base_url=b.url, api_key=b.key, max_retries=0)
        message = claude.messages.with_raw_response.create(
            model="llama3@alice", max_tokens=50, messages=HI
        )
        assert message.headers["aihub-served-by"] == "alice"
        request_id = message.headers["aihub-request-id"]
        assert message.parse().id == "msg_" + request_id.removeprefix("req_")


def peer_error(node, model: str) -> dict:  # type: ignore[no-untyped-def]
    with node.client() as client:
        response = client.post("/v1/chat/completions", json={"model": model, "messages": HI})
    assert response.status_code >= 400, response.text
    return {"status": response.status_code, **response.json()["error"]}


def test_a_revoked_peer_is_told_at_once_and_tells_its_clients(tmp_path):
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    with alice.run(), bob.run() as b:
        cli("join", invite(alice), "--data-dir", str(bob.path))
        assert wait_for(lambda: "llama3@alice" in model_owners(b))
        out = cli("peers", "revoke", "bob", "--data-dir", str(alice.path))
        assert "it was told" in out
        # Told before the command returned: bob lists and routes nothing of alice's now.
        assert "llama3" not in model_owners(b) and "llama3@alice" not in model_owners(b)
        assert peer_statuses(bob)["alice"] == "revoked_by_peer"
        for model in ("llama3", "llama3@alice"):
            error = peer_error(b, model)
            assert error["code"] == "peer_revoked" and "alice" in error["message"], error
            assert "127.0.0.1" not in error["message"]
        table = cli("peers", "list", "--data-dir", str(bob.path))
        assert "revoked us" in table
    assert ("peer.revoke", node_id(bob)) in audit_actions(alice.path)
    assert ("peer.revoked_us", node_id(alice)) in audit_actions(bob.path)


def test_a_peer_that_was_away_learns_of_its_revocation_from_its_next_request(tmp_path):
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    carol = make_peer(tmp_path, "carol")
    # No scheduled health check comes in time: bob learns from his client's request.
    bob.dir.set_config("health_interval = 1", "health_interval = 3600")
    with alice.run(), carol.run():
        with bob.run() as b:
            cli("join", invite(alice), "--data-dir", str(bob.path))
            cli("join", invite(carol), "--data-dir", str(bob.path))
            assert wait_for(lambda: "llama3@alice" in model_owners(b))
        out = " ".join(cli("peers", "revoke", "bob", "--data-dir", str(alice.path)).split())
        assert "it could not be reached" in out and "next health check" in out
        with bob.run() as b:
            # Not a 502 "invalid_api_key", which reads as if the client's own key were bad.
            error = peer_error(b, "llama3")
            assert error["code"] == "peer_revoked" and "alice" in error["message"], error
            assert peer_statuses(bob)["alice"] == "revoked_by_peer"
            assert "llama3" not in model_owners(b)
        # Bob checks his peers every second now: alice is no longer one of them, so her audit
        # log gets no event per check (carol's checks show that bob's run).
        bob.dir.set_config("health_interval = 3600", "health_interval = 1")
        before = [a for a, _ in audit_actions(alice.path) if a.startswith("auth.")]
        started = int(time.time())
        with bob.run():
            assert wait_for(lambda: _checked_at(bob, node_id(carol)) >= started + 3)
        after = [a for a, _ in audit_actions(alice.path) if a.startswith("auth.")]
        assert after == before


def _checked_at(peer: Peer, other: str) -> int:
    async def read() -> int:
        store = await open_store(peer.path / DATABASE_FILE)
        try:
            return (await store.peers.peer_health()).get(other, (False, None, 0))[2]
        finally:
            await store.close()

    return asyncio.run(read())


def test_a_third_party_cannot_make_a_node_drop_a_peer(tmp_path):
    """An attacker with a key pair of its own: its notices, forged or replayed, posted or
    answered in the peer's place, change nothing."""
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    carol = make_peer(tmp_path, "carol", LLAMA)
    attacker = NodeIdentity.generate()
    with alice.run(), carol.run(), bob.run() as b:
        cli("join", invite(alice), "--data-dir", str(bob.path))
        cli("join", invite(carol), "--data-dir", str(bob.path))
        assert wait_for(lambda: {"llama3@alice", "llama3@carol"} <= set(model_owners(b)))
        bobs_key_id = _key_id_from(bob, node_id(alice))

        async def post(signer: NodeIdentity, notice: bytes) -> int:
            async with httpx.AsyncClient() as client:
                url = b.url + NOTICE_PATH
                response = await signed_request(client, signer, "POST", url, None, notice)
                return response.status_code

        def notice(issuer: NodeIdentity, key_id: str, signer: NodeIdentity | None = None) -> bytes:
            fields = msgspec.to_builtins(make_revocation(issuer, node_id(bob), key_id))
            if signer is not None:  # claims issuer's name, signed with another key
                fake = make_revocation(signer, node_id(bob), key_id)
                fields["sig"] = fake.sig
            return msgspec.json.encode(fields)

        carol_identity = NodeIdentity.load(carol.path / IDENTITY_FILE)
        alice_identity = NodeIdentity.load(alice.path / IDENTITY_FILE)
        # Signed by the attacker, in its own name or in alice's: not a peer of bob's.
        assert asyncio.run(post(attacker, notice(attacker, bobs_key_id))) == 401
        assert asyncio.run(post(attacker, notice(alice_identity, bobs_key_id, attacker))) == 401
        # Carol is bob's peer, but she can speak only for herself: not for alice ...
        assert (
            asyncio.run(post(carol_identity, notice(alice_identity, bobs_key_id, carol_identity)))
            == 400
        )
        # ... and not about another key than the one she gave bob.
        assert asyncio.run(post(carol_identity, notice(carol_identity, bobs_key_id))) == 400
        # A real notice of alice's, for the right key, replayed: its request was signed once.
        real = notice(alice_identity, bobs_key_id)
        assert asyncio.run(post(attacker, real)) == 401
        assert peer_statuses(bob) == {"alice": "active", "carol": "active"}
        assert {"llama3@alice", "llama3@carol"} <= set(model_owners(b))

    # Alice is gone; whoever answers at her address says "revoked", with a notice it signed
    # itself in alice's name: bob asks, checks, and keeps alice as his peer.
    bob.dir.set_config("health_interval = 1", "health_interval = 3600")
    forged = msgspec.json.encode(
        {
            "error": {"message": "revoked", "type": "x", "code": "peer_revoked", "param": None},
            "revocation": msgspec.json.decode(notice(alice_identity, bobs_key_id, attacker)),
        }
    )
    with carol.run(), _impostor(alice.port, forged), bob.run() as b:
        reply = sdk(b).chat.completions.create(model="llama3", messages=HI)
        assert reply.choices[0].message.content == "echo: hi there"  # carol served it
        error = peer_error(b, "llama3@alice")
        assert error["code"] != "peer_revoked" and "alice" in error["message"], error
        assert peer_statuses(bob) == {"alice": "active", "carol": "active"}


@contextmanager
def _impostor(port: int, answer: bytes) -> Iterator[str]:
    """Something at `port` that answers every request 401 with `answer`."""

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": answer})

    with serve_app(app, port=port) as url:
        yield url


def _key_id_from(peer: Peer, issuer: str) -> str:
    """The id of the cross-node key `issuer` gave `peer`."""
    from federation.sealing import unseal
    from node.gateway.keys import key_id_of

    async def read() -> str:
        store = await open_store(peer.path / DATABASE_FILE)
        try:
            record = await store.peers.peer(issuer)
            assert record is not None and record.key_from_them
            identity = NodeIdentity.load(peer.path / IDENTITY_FILE)
            key_id = key_id_of(unseal(identity, record.key_from_them).decode())
            assert key_id
            return key_id
        finally:
            await store.close()

    return asyncio.run(read())


def test_a_peers_cap_refusal_is_not_retried_and_names_the_peer(tmp_path):
    bob = make_peer(tmp_path, "bob")
    carol = make_peer(tmp_path, "carol", LLAMA)
    with carol.run() as c, bob.run() as b:
        cli("join", invite(carol, "--cap", "0.0002"), "--data-dir", str(bob.path))
        assert wait_for(lambda: "llama3@carol" in model_owners(b))
        client = sdk(b)
        for _ in range(40):
            try:
                client.chat.completions.create(model="llama3", messages=HI, max_tokens=5)
            except openai.RateLimitError as exc:
                refusal = exc
                break
        else:
            raise AssertionError("carol's cap for bob never ran out")
        body = refusal.body
        assert isinstance(body, dict) and body["code"] == "peer_cap_exceeded"
        assert "carol" in body["message"] and "127.0.0.1" not in body["message"]
        assert str(c.url.rsplit(":", 1)[1]) not in body["message"]
        # One more request is one more attempt at carol: asked once, not three times.
        attempts = _failed_attempts(b, "llama3@carol", "429")
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="llama3", messages=HI, max_tokens=5)
        assert _failed_attempts(b, "llama3@carol", "429") == attempts + 1


def _failed_attempts(node, deployment: str, status: str) -> float:  # type: ignore[no-untyped-def]
    """The node's count of failed upstream attempts at `deployment` (its metrics)."""
    with node.client() as client:
        text = client.get("/metrics").text
    label = f'aihub_upstream_errors_total{{deployment="{deployment}",status="{status}"}}'
    lines = [line for line in text.splitlines() if line.startswith(label)]
    return float(lines[0].split()[-1]) if lines else 0.0


def peers_table(peer: Peer, *extra: str, columns: int = 80) -> str:
    result = CliRunner().invoke(
        main,
        ["peers", "list", *extra, "--data-dir", str(peer.path)],
        env={"COLUMNS": str(columns)},
    )
    assert result.exit_code == 0, result.output
    return result.stdout


def health_of(peer: Peer, name: str) -> bool | None:
    listed = msgspec.json.decode(
        cli("peers", "list", "--format", "json", "--data-dir", str(peer.path))
    )
    return {row["name"]: row["healthy"] for row in listed}[name]


def test_peers_list_reads_well_at_80_columns_and_a_peer_that_answers_is_up(tmp_path):
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    with bob.run() as b:
        with alice.run():
            cli("join", invite(alice), "--data-dir", str(bob.path))
            assert wait_for(lambda: health_of(bob, "alice") is True)
            table = peers_table(bob)
            # No line wider than the terminal: the node id is shortened, and it and the health
            # stay on the peer's first line.
            assert all(len(line) <= 80 for line in table.splitlines())
            (row,) = [line for line in table.splitlines() if "alice" in line]
            assert "up, " in row and " ms (" in row and "ago)" in row
            assert node_id(alice)[:14] in row and node_id(alice) not in row
            assert node_id(alice) in peers_table(bob, "--wide", columns=200)
            assert node_id(alice) in cli("peers", "list", "--json", "--data-dir", str(bob.path))
        # Alice stops: bob's checks find her down, and say since when.
        assert wait_for(lambda: health_of(bob, "alice") is False)
        (row,) = [line for line in peers_table(bob).splitlines() if "alice" in line]
        assert "down (" in row
        # She is back: the first request she serves shows her up, without waiting for bob's
        # next check (which backs off from a peer that failed).
        with alice.run():
            assert wait_for(lambda: answers_ok(b, "llama3@alice"))
            assert wait_for(lambda: health_of(bob, "alice") is True)


def answers_ok(node, model: str) -> bool:  # type: ignore[no-untyped-def]
    with node.client() as client:
        response = client.post("/v1/chat/completions", json={"model": model, "messages": HI})
    return response.status_code == 200


def test_federation_admin_actions_are_audited(tmp_path):
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    with alice.run() as a, bob.run() as b:
        cli("peers", "request", f"{node_id(alice)}@{a.url}", "--data-dir", str(bob.path))
        cli("peers", "approve", "bob", "--models", "llama3", "--data-dir", str(alice.path))
        assert wait_for(lambda: answers_ok(b, "llama3@alice"))
        assert wait_for(
            lambda: (
                "settled"
                in run("ledger", "settle", "alice", "--data-dir", str(bob.path))[1].lower()
            )
        )
    assert ("peer.approve", node_id(bob)) in audit_actions(alice.path)
    assert ("peer.request", node_id(alice)) in audit_actions(bob.path)
    assert ("ledger.settle", node_id(alice)) in audit_actions(bob.path)
    # And `aihub audit` shows them, as every admin action.
    shown = cli("audit", "--data-dir", str(alice.path))
    assert "peer.approve" in shown


def test_hostile_input_to_the_revocation_endpoint_and_a_peer_named_oddly(tmp_path):
    alice = make_peer(tmp_path, "alice", LLAMA)
    # A peer chooses its own name: it reaches a header only percent-encoded.
    odd = "Zoë's\nhub"
    alice.dir.set_config('name = "alice"', 'name = "Zoë\'s\\nhub"')
    bob = make_peer(tmp_path, "bob")
    with alice.run(), bob.run() as b:
        cli("join", invite(alice), "--data-dir", str(bob.path))
        assert wait_for(lambda: f"llama3@{odd}" in model_owners(b))
        raw = sdk(b).chat.completions.with_raw_response.create(model="llama3", messages=HI)
        assert raw.headers["aihub-served-by"] == "Zo%C3%AB's%0Ahub"
        url = b.url + NOTICE_PATH
        for body in (b"", b"{}", b"\xff\xfe", b"[1,2", b"x" * 70_000, b"[" * 100 + b"]" * 100):
            response = httpx.post(url, content=body)
            assert 400 <= response.status_code < 500, (body[:10], response.text)
            assert "error" in response.json()
        # Signed by alice, bob's peer, but not a notice (or not one about bob): 400.
        identity = NodeIdentity.load(alice.path / IDENTITY_FILE)
        for body in (b'{"v": 1}', b'{"v": 2, "issuer": 1}', b"[]", b'"x"'):

            async def post(body: bytes = body) -> httpx.Response:
                async with httpx.AsyncClient() as client:
                    return await signed_request(client, identity, "POST", url, None, body)

            response = asyncio.run(post())
            assert response.status_code == 400, response.text
            assert response.json()["error"]["code"] == "invalid_revocation"
        assert peer_statuses(bob) == {odd: "active"}
