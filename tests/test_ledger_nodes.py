"""The ledger between real nodes: receipts both ways, balances that agree to the micro-unit on
both sides, reconciliation that recovers lost receipts, settlement both sign, netting across
three nodes, tampering found by `verify`, and a peer that equivocates suspended."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import httpx
import msgspec
from click.testing import CliRunner

from federation.identity import NodeIdentity
from ledger.receipts import make_receipt, receipt_fields
from node.cli.main import main
from node.config import DATABASE_FILE, IDENTITY_FILE
from node.storage import open_store
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

MISTRAL = (
    '[[models]]\nname = "mistral"\nprovider = "echo"\nprice_in = 2_000_000\nprice_out = 3_000_000'
)
PHI = '[[models]]\nname = "phi"\nprovider = "echo"\nprice_in = 500_000\nprice_out = 700_000'


def node_id(peer: Peer) -> str:
    return NodeIdentity.load(peer.path / IDENTITY_FILE).node_id


def ledger(peer: Peer, *args: str) -> object:
    return msgspec.json.decode(cli("ledger", *args, "--json", "--data-dir", str(peer.path)))


def balance_with(peer: Peer, other: Peer) -> dict:
    rows = ledger(peer, "balance")
    (row,) = [r for r in rows if r["peer"] == node_id(other)]  # type: ignore[union-attr]
    return row


def receipts_at(peer: Peer) -> list[tuple]:
    with sqlite3.connect(peer.path / DATABASE_FILE) as db:
        return db.execute(
            "SELECT provider, consumer, seq, amount, csig IS NOT NULL FROM receipts"
            " ORDER BY provider, consumer, seq"
        ).fetchall()


def chat(node, model: str, tokens: int) -> None:  # type: ignore[no-untyped-def]
    with node.client() as client:
        body = {"model": model, "messages": HI, "max_tokens": tokens}
        assert client.post("/v1/chat/completions", json=body).status_code == 200


def stream(node, model: str) -> None:  # type: ignore[no-untyped-def]
    with node.client() as client:
        body = {"model": model, "messages": HI, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            assert b"[DONE]" in response.read()
            assert b"aihub.receipt" not in response.read()


def all_countersigned(*peers: Peer) -> bool:
    return all(row[4] for peer in peers for row in receipts_at(peer))


def test_books_agree_reconcile_settle_and_net_across_three_nodes(tmp_path: Path) -> None:
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob", MISTRAL)
    carol = make_peer(tmp_path, "carol", PHI)
    for peer in (alice, bob, carol):
        peer.dir.set_config("health_interval = 1", "health_interval = 1")
    with alice.run() as a, bob.run() as b, carol.run() as c:
        # Everyone may use everyone's model.
        for joiner, issuer in (
            (bob, alice),
            (alice, bob),
            (carol, alice),
            (carol, bob),
            (alice, carol),
        ):
            cli("join", invite(issuer), "--data-dir", str(joiner.path))
        assert wait_for(lambda: answers(b, "llama3", max_tokens=3))
        assert wait_for(lambda: answers(a, "mistral", max_tokens=3))
        assert wait_for(
            lambda: answers(c, "llama3", max_tokens=3) and answers(c, "mistral", max_tokens=3)
        )
        assert wait_for(lambda: answers(a, "phi", max_tokens=3))
        for tokens in (1, 5, 9):
            chat(b, "llama3", tokens)
            chat(a, "mistral", tokens)
            chat(c, "llama3", tokens)
            chat(c, "mistral", tokens)
        stream(b, "llama3")
        stream(a, "phi")
        # Countersignatures go back in batches, off the request path.
        assert wait_for(lambda: all_countersigned(alice, bob, carol), seconds=15)

        # Both sides of each pair agree to the micro-unit.
        for one, other in ((alice, bob), (alice, carol), (bob, carol)):
            mine, theirs = balance_with(one, other), balance_with(other, one)
            assert mine["we_used"] == theirs["they_used"] > 0 or other is carol
            assert mine["they_used"] == theirs["we_used"]
            assert mine["net"] == -theirs["net"]
            pair = {node_id(one), node_id(other)}
            assert [r for r in receipts_at(one) if set(r[:2]) == pair] == [
                r for r in receipts_at(other) if set(r[:2]) == pair
            ]

        # Bob lost two receipts alice issued him (say, a crash before he wrote them).
        with sqlite3.connect(bob.path / DATABASE_FILE) as db:
            db.execute("DROP TRIGGER receipts_no_delete")
            db.execute(
                "DELETE FROM receipts WHERE provider = ? AND seq IN (1, 3)", (node_id(alice),)
            )
        report = ledger(bob, "reconcile", "alice")
        assert report["missing_ours"]["count"] == 2 and report["missing_ours"]["amount"] > 0  # type: ignore[index]
        assert report["equivocation"]["count"] == 0 and not report["suspended"]  # type: ignore[index]
        assert all(check["ok"] for check in ledger(bob, "verify"))  # type: ignore[union-attr]
        again = ledger(bob, "reconcile", "alice")
        assert again["missing_ours"]["count"] == again["missing_theirs"]["count"] == 0  # type: ignore[index]

        # Settle every pair; the statement is the same on both sides, and balances restart.
        owed = {}
        for one, other in ((bob, alice), (carol, alice), (carol, bob)):
            statement = ledger(one, "settle", other.dir.path.name)
            assert statement in [
                msgspec.json.decode(s)
                for s in cli("ledger", "statements", "--data-dir", str(other.path)).splitlines()
            ]
            assert statement["sig_a"] and statement["sig_b"]  # type: ignore[index]
            owed[(one.dir.path.name, other.dir.path.name)] = statement
            assert balance_with(one, other)["net"] == 0

        # Netting across the group: alice has her statements with bob and carol; bob's with
        # carol is shared with her. At most n - 1 = 2 transfers clear everything.
        shared = tmp_path / "bob-statements.jsonl"
        shared.write_text(cli("ledger", "statements", "--data-dir", str(bob.path)))
        plan = ledger(alice, "net", str(shared))
        assert len(plan["transfers"]) <= 2  # type: ignore[index]
        balances = plan["balances"]  # type: ignore[index]
        assert sum(balances.values()) == 0
        cleared = dict(balances)
        for payer, payee, amount in plan["transfers"]:  # type: ignore[index]
            cleared[payer] += amount
            cleared[payee] -= amount
        assert set(cleared.values()) == {0}
        expected: dict[str, int] = {}
        for s in owed.values():
            expected[s["b"]] = expected.get(s["b"], 0) + s["net"]
            expected[s["a"]] = expected.get(s["a"], 0) - s["net"]
        assert {k: v for k, v in balances.items() if v} == {k: v for k, v in expected.items() if v}
        # As printed: the nodes by the names alice knows them by, herself as "us".
        names = {node_id(alice): "us", node_id(bob): "bob", node_id(carol): "carol"}
        printed = cli("ledger", "net", str(shared), "--data-dir", str(alice.path)).splitlines()
        assert [line.rsplit(" ", 1)[0] for line in printed] == [
            f"{names[payer]} pays {names[payee]}"
            for payer, payee, _ in plan["transfers"]  # type: ignore[index]
        ]

        csv_export = cli("ledger", "export", "--format", "csv", "--data-dir", str(alice.path))
        assert csv_export.splitlines()[0].startswith("iat,provider,consumer,seq")
        assert len(csv_export.splitlines()) - 1 == len(receipts_at(alice))


def test_tampering_is_found_and_an_equivocating_peer_is_suspended(tmp_path: Path) -> None:
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    with alice.run(), bob.run() as b:
        cli("join", invite(alice), "--data-dir", str(bob.path))
        assert wait_for(lambda: answers(b, "llama3", max_tokens=3))
        for tokens in (1, 2, 3):
            chat(b, "llama3", tokens)
        assert wait_for(lambda: len(receipts_at(bob)) == 4)

        # Alice signs a second, different receipt for seq 2 and hands it to bob.
        identity = NodeIdentity.load(alice.path / IDENTITY_FILE)
        with sqlite3.connect(bob.path / DATABASE_FILE) as db:
            prev = db.execute("SELECT hash FROM receipts WHERE seq = 1").fetchone()[0]
        forged = make_receipt(
            identity.sign,
            id="req_forged",
            provider=identity.node_id,
            consumer=node_id(bob),
            key_id="x",
            model="llama3",
            tokens_in=1,
            tokens_out=1,
            amount=1,
            price_seq=1,
            seq=2,
            prev=prev,
        )
        body = msgspec.json.encode({"receipts": [receipt_fields(forged)]})
        url = b.url + "/federation/receipts"
        bob_key_for_alice = _key_issued_to(bob, alice)
        response = httpx.post(
            url, content=body, headers=_signed_by(alice.path, url, body, bob_key_for_alice)
        )
        assert response.status_code in (200, 401)

        # Whether or not bob's node took it in, reconciliation with alice's copy proves it
        # once we hold two different receipts for one seq: record it and suspend alice.
        with sqlite3.connect(bob.path / DATABASE_FILE) as db:
            db.execute("DROP TRIGGER receipts_no_delete")
            db.execute("DROP TRIGGER receipts_no_rewrite")
            db.execute(
                "UPDATE receipts SET body = ?, hash = ?, amount = 1 WHERE seq = 2",
                (_stored_body(forged), _hash(forged)),
            )
        broken = CliRunner().invoke(main, ["ledger", "verify", "--data-dir", str(bob.path)])
        # Its countersignature no longer matches: the first broken link, named precisely.
        assert broken.exit_code == 1 and "(seq 2)" in broken.output and "csig" in broken.output
        report = ledger(bob, "reconcile", "alice")
        assert report["equivocation"]["count"] == 1 and report["suspended"]  # type: ignore[index]
        peers = msgspec.json.decode(
            cli("peers", "list", "--all", "--json", "--data-dir", str(bob.path))
        )
        assert [p["status"] for p in peers if p["name"] == "alice"] == ["suspended"]
        # Bob's node stops routing to alice.
        assert wait_for(lambda: not answers(b, "llama3", max_tokens=3))


def _key_issued_to(holder: Peer, issuer: Peer) -> str:
    from federation.sealing import unseal

    async def read() -> str:
        store = await open_store(holder.path / DATABASE_FILE)
        try:
            (peer,) = [p for p in await store.peers.peers() if p.node_id == node_id(issuer)]
            assert peer.key_from_them
            identity = NodeIdentity.load(holder.path / IDENTITY_FILE)
            return unseal(identity, peer.key_from_them).decode()
        finally:
            await store.close()

    return asyncio.run(read())


def _stored_body(receipt) -> str:  # type: ignore[no-untyped-def]
    from node.peers.receipts import stored

    return stored(receipt).body


def _hash(receipt) -> str:  # type: ignore[no-untyped-def]
    from ledger.receipts import receipt_hash

    return receipt_hash(receipt)


def test_reconciliation_runs_on_its_schedule(tmp_path: Path) -> None:
    """With no one asking, bob's node reconciles with alice every `reconcile_interval` and
    recovers the receipts it lost."""
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    bob.dir.set_config("reconcile_interval = 3600", "reconcile_interval = 10")
    with alice.run(), bob.run() as b:
        cli("join", invite(alice), "--data-dir", str(bob.path))
        assert wait_for(lambda: answers(b, "llama3", max_tokens=3))
        for tokens in (1, 2, 3):
            chat(b, "llama3", tokens)
        assert wait_for(lambda: len(receipts_at(bob)) == 4 and all_countersigned(alice, bob))
        with sqlite3.connect(bob.path / DATABASE_FILE) as db:
            db.execute("DROP TRIGGER receipts_no_delete")
            db.execute("DELETE FROM receipts WHERE seq IN (2, 3)")
        assert len(receipts_at(bob)) == 2
        assert wait_for(lambda: receipts_at(bob) == receipts_at(alice), seconds=25)


def test_a_peer_pays_the_advertised_price_whichever_deployment_serves(tmp_path: Path) -> None:
    """Alice advertises llama3 at its cheapest deployment's price; that deployment is down,
    so a dearer one serves. Bob is billed the advertised price, so his books take the
    receipt (one above the advert would be refused as more than he agreed to pay)."""
    cheap_but_down = (
        '[[models]]\nname = "llama3"\nprovider = "openai"\nmodel = "m"\n'
        'base_url = "http://127.0.0.1:9/v1"\nprice_in = 1_000_000\nprice_out = 1_000_000'
    )
    dear = (
        '[[models]]\nname = "llama3"\nprovider = "echo"\n'
        "price_in = 9_000_000\nprice_out = 9_000_000"
    )
    alice = make_peer(tmp_path, "alice", cheap_but_down, dear)
    bob = make_peer(tmp_path, "bob")
    with alice.run(), bob.run() as b:
        cli("join", invite(alice), "--data-dir", str(bob.path))
        assert wait_for(lambda: answers(b, "llama3", max_tokens=3))
        assert wait_for(lambda: len(receipts_at(bob)) == 1 and all_countersigned(alice, bob))
        with sqlite3.connect(alice.path / DATABASE_FILE) as db:
            (deployment, tokens_in, tokens_out, cost) = db.execute(
                "SELECT deployment, tokens_in, tokens_out, cost_micros FROM usage"
            ).fetchone()
        assert deployment.startswith("llama3") and "echo" in deployment
        assert cost == tokens_in + tokens_out  # at 1,000,000 micros per 1M tokens, both ways
        assert receipts_at(bob)[0][3] == receipts_at(alice)[0][3] == cost
