"""Settling between real nodes that holds: the provider side of a pair that only consumes from
it reconciles and settles; a settlement whose answer was lost is recovered and settling again
works (re-sending one returns the same statement); netting refuses statements that name
nodes the netting node does not know (sybils a hostile script made up and signed)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import msgspec
from click.testing import CliRunner

from federation.identity import NodeIdentity
from federation.transport import signed_headers
from ledger.receipts import GENESIS
from ledger.settlement import Statement, make_statement, sign_statement
from node.cli.main import main
from node.config import DATABASE_FILE, IDENTITY_FILE
from node.peers.books.period import open_pair
from node.storage import opened
from tests.mocks.server import serve_app
from tests.test_federation import (
    HI,
    LLAMA,
    Peer,
    _signed_by,
    answers,
    cli,
    invite,
    make_peer,
    wait_for,
)
from tests.test_ledger_nodes import (
    _key_issued_to,
    all_countersigned,
    balance_with,
    chat,
    ledger,
    node_id,
    receipts_at,
)


def statements_of(peer: Peer) -> list[dict]:
    lines = cli("ledger", "statements", "--data-dir", str(peer.path)).splitlines()
    return [msgspec.json.decode(line) for line in lines]


def pair_of_nodes(tmp_path: Path) -> tuple[Peer, Peer]:
    """Alice provides llama3; bob only consumes it (alice holds no key of bob's)."""
    return make_peer(tmp_path, "alice", LLAMA), make_peer(tmp_path, "bob")


def traffic(node, peers: tuple[Peer, ...], requests: int, total: int) -> None:  # type: ignore[no-untyped-def]
    for tokens in range(1, requests + 1):
        chat(node, "llama3", tokens)
    assert wait_for(lambda: len(receipts_at(peers[1])) == total and all_countersigned(*peers))


def test_the_provider_only_side_reconciles_and_settles(tmp_path: Path) -> None:
    alice, bob = pair_of_nodes(tmp_path)
    with alice.run(), bob.run() as b:
        cli("join", invite(alice), "--data-dir", str(bob.path))
        assert wait_for(lambda: answers(b, "llama3", max_tokens=3))
        traffic(b, (alice, bob), 3, 4)

        # Alice never joined bob: her requests carry only her pinned key's signature.
        report = ledger(alice, "reconcile", "bob")
        assert report["matched"]["count"] == 4  # type: ignore[index]
        assert report["missing_ours"]["count"] == report["missing_theirs"]["count"] == 0  # type: ignore[index]
        statement = ledger(alice, "settle", "bob")
        assert statement["sig_a"] and statement["sig_b"]  # type: ignore[index]
        assert statements_of(bob) == statements_of(alice) == [statement]
        assert balance_with(alice, bob)["net"] == balance_with(bob, alice)["net"] == 0

        # The signature alone is a pinned peer's only: a stranger's key pair is refused, and
        # a bad query is a 400, never a 500.
        alices = NodeIdentity.load(alice.path / IDENTITY_FILE)
        stranger = NodeIdentity.generate()
        for path in ("/federation/settlements", f"/federation/receipts?provider={node_id(bob)}"):
            url = b.url + path
            assert httpx.get(url, headers=signed_headers(alices, "GET", url)).status_code == 200
            refused = httpx.get(url, headers=signed_headers(stranger, "GET", url))
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "bad_signature"
        for bad in ("--5", "1e3", "x", "9" * 16):
            url = b.url + f"/federation/settlements?after_iat={bad}"
            answer = httpx.get(url, headers=signed_headers(alices, "GET", url))
            assert answer.status_code == 400 and answer.json()["error"]["param"] == "after_iat"


def _proposal(proposer: Peer, other: Peer) -> bytes:
    """The settlement request `aihub ledger settle` would send, built from the proposer's own
    books and signed with its key."""

    async def build() -> bytes:
        identity = NodeIdentity.load(proposer.path / IDENTITY_FILE)
        async with opened(proposer.path / DATABASE_FILE) as store:
            pair = await open_pair(store, identity.node_id, node_id(other))
        statement = make_statement(
            pair.a_to_b(), pair.b_to_a(), pair.a, pair.b, previous=pair.previous
        )
        side = "a" if identity.node_id == pair.a else "b"
        signed = sign_statement(statement, identity.sign, side)
        return msgspec.json.encode({"statement": msgspec.to_builtins(signed)})

    return asyncio.run(build())


def test_a_lost_settlement_answer_leaves_the_pair_able_to_settle(tmp_path: Path) -> None:
    alice, bob = pair_of_nodes(tmp_path)
    with alice.run() as a, bob.run() as b:
        cli("join", invite(alice), "--data-dir", str(bob.path))
        assert wait_for(lambda: answers(b, "llama3", max_tokens=3))
        traffic(b, (alice, bob), 3, 4)

        # Bob proposes a settlement; alice countersigns and keeps it; the answer never
        # reaches bob's books.
        body = _proposal(bob, alice)
        url = a.url + "/federation/settlements"
        key = _key_issued_to(bob, alice)
        lost = httpx.post(url, content=body, headers=_signed_by(bob.path, url, body, key))
        assert lost.status_code == 200
        signed = lost.json()["statement"]
        assert statements_of(bob) == [] and statements_of(alice) == [signed]

        # The same request again (a retry, freshly signed) is answered with the same statement.
        again = httpx.post(url, content=body, headers=_signed_by(bob.path, url, body, key))
        assert again.status_code == 200 and again.json()["statement"] == signed
        assert statements_of(alice) == [signed]

        # More traffic, then bob settles as usual: he recovers the statement he never got,
        # and the new period starts where it ended.
        traffic(b, (alice, bob), 2, 6)
        statement = ledger(bob, "settle", "alice")
        assert statement["from_seq"] == signed["to_seq"] + 1  # type: ignore[index]
        amounts = {row[2]: row[3] for row in receipts_at(alice)}
        assert signed["a_owes_b"] + signed["b_owes_a"] == sum(amounts[s] for s in (1, 2, 3, 4))
        assert statement["a_owes_b"] + statement["b_owes_a"] == amounts[5] + amounts[6]  # type: ignore[index]
        assert statements_of(bob) == statements_of(alice) == [signed, statement]
        assert balance_with(alice, bob)["net"] == balance_with(bob, alice)["net"] == 0
        # Settling again with nothing new is the same statement, on both sides.
        assert ledger(bob, "settle", "alice") == statement
        assert ledger(alice, "settle", "bob") == statement
        assert statements_of(bob) == statements_of(alice) == [signed, statement]
        # Both books agree on the whole history.
        assert receipts_at(alice) == receipts_at(bob)


def _sybil_statement(one: NodeIdentity, other: NodeIdentity, owed: int) -> dict:
    """A statement both of whose signatures are valid: `one` owes `other` `owed`."""
    a, b = sorted((one, other), key=lambda identity: identity.node_id)
    a_owes_b, b_owes_a = (owed, 0) if one is a else (0, owed)
    statement = Statement(
        a=a.node_id,
        b=b.node_id,
        from_seq=1,
        to_seq=0,
        head_a_to_b=GENESIS,
        head_b_to_a=GENESIS,
        a_owes_b=a_owes_b,
        b_owes_a=b_owes_a,
        net=a_owes_b - b_owes_a,
        iat=int(time.time()),
    )
    signed = sign_statement(sign_statement(statement, a.sign, "a"), b.sign, "b")
    return msgspec.to_builtins(signed)


def test_netting_refuses_statements_that_name_nodes_it_does_not_know(tmp_path: Path) -> None:
    alice, bob = pair_of_nodes(tmp_path)
    with alice.run() as a, bob.run() as b:
        cli("join", invite(alice), "--data-dir", str(bob.path))
        assert wait_for(lambda: answers(b, "llama3", max_tokens=3))
        traffic(b, (alice, bob), 2, 3)
        real = ledger(bob, "settle", "alice")
        owed = real["a_owes_b"] + real["b_owes_a"]  # type: ignore[index]
        honest = ledger(alice, "net")
        assert [list(t) for t in honest["transfers"]] == [[node_id(bob), node_id(alice), owed]]  # type: ignore[index]

        # A hostile script makes two key pairs, has one "owe" the other as much as bob owes
        # alice, and signs both sides: without the check, the plan has bob pay a sybil.
        debtor, creditor = NodeIdentity.generate(), NodeIdentity.generate()
        sybils = tmp_path / "sybils.jsonl"
        made_up = _sybil_statement(debtor, creditor, owed)
        # And bob, hostile himself, signs a statement with a key pair of his own making.
        bobs = NodeIdentity.load(bob.path / IDENTITY_FILE)
        with_bob = _sybil_statement(creditor, bobs, owed)
        for statement in (made_up, with_bob):
            sybils.write_text(msgspec.json.encode(statement).decode() + "\n")
            refused = CliRunner().invoke(
                main, ["ledger", "net", str(sybils), "--data-dir", str(alice.path)]
            )
            assert refused.exit_code == 1, refused.output
            assert "not a peer of this node" in refused.output
            assert creditor.node_id in refused.output
            with a.client() as admin:
                answer = admin.post("/admin/ledger/net", json={"statements": [statement]})
            assert answer.status_code == 400
            error = answer.json()["error"]
            assert error["code"] == "ledger_error" and "not a peer" in error["message"]

        # The honest plan is unchanged.
        assert ledger(alice, "net") == honest


class HostilePeer:
    """A hostile peer's node: every answer is 200 and either longer than any honest page
    (`flood`) or a short JSON of the wrong shape."""

    def __init__(self) -> None:
        self.flood = True

    async def __call__(self, scope: dict, receive: object, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        chunks = [b"[" * 65536] * (12 * 16) if self.flood else [b'[1, "\x1b[2J"]']
        for chunk in chunks:  # 12 MiB flooded, without a content-length
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def test_a_peer_answering_without_end_is_cut_off(tmp_path: Path) -> None:
    """Mallory joined alice with a URL where a script answers every ledger question with
    megabytes of brackets: alice reads no more than a page's worth and says so; the CLI and
    the admin API answer a clear error, never a traceback or a 500."""
    alice = make_peer(tmp_path, "alice", LLAMA)
    mallory = make_peer(tmp_path, "mallory")
    hostile = HostilePeer()
    with alice.run() as a, serve_app(hostile, port=mallory.port):
        cli("join", invite(alice), "--data-dir", str(mallory.path))
        refused = CliRunner().invoke(
            main, ["ledger", "reconcile", "mallory", "--data-dir", str(alice.path)]
        )
        assert refused.exit_code == 1 and "too large" in refused.output, refused.output
        assert "Traceback" not in refused.output
        key = _key_issued_to(mallory, alice)
        url = a.url + "/v1/chat/completions"
        body = msgspec.json.encode({"model": "llama3", "messages": HI, "max_tokens": 2})
        answer = httpx.post(url, content=body, headers=_signed_by(mallory.path, url, body, key))
        # Alice was not restored: her chain head is her own, and mallory is served as any
        # peer is (what its copy of the chain says stops a request only after a restore).
        assert answer.status_code == 200, answer.text

        # A short answer of the wrong shape: a clear error, by the CLI and the admin API.
        hostile.flood = False
        refused = CliRunner().invoke(
            main, ["ledger", "reconcile", "mallory", "--data-dir", str(alice.path)]
        )
        assert refused.exit_code == 1 and "not valid" in refused.output, refused.output
        with a.client() as admin:
            for action in ("reconcile", "settle"):
                answer = admin.post(f"/admin/ledger/{action}/mallory")
                assert answer.status_code == 502, answer.text
                assert answer.json()["error"]["code"] == "ledger_error"
