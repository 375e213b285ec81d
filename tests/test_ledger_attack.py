"""A peer that turned hostile cannot bill a node for what it never asked: through real nodes,
mallory (joined both ways with bob) posts receipts naming herself provider of requests bob
never sent her, of bob's requests to alice, for another model, under an advert seq bob never
saw, or naming alice as provider; none is stored, counted in `ledger balance`, reconciled in or
countersigned into a statement, and bob refuses her settlement over those amounts. Receipts
bob lost in a crash come back countersigned; `ledger verify` checks statements, and a moved
head never counts a settled receipt twice."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import msgspec
from click.testing import CliRunner

from federation.identity import NodeIdentity
from ledger.canonical import b64url_decode
from ledger.receipts import Receipt, make_receipt, parse_receipt, receipt_fields, receipt_hash
from node.app import create_app
from node.cli.main import main
from node.config import DATABASE_FILE, IDENTITY_FILE
from node.peers.receipts import stored
from tests.conftest import RunningNode
from tests.mocks.server import serve_app
from tests.test_federation import LLAMA, Peer, _signed_by, answers, cli, invite, make_peer, wait_for
from tests.test_ledger_nodes import (
    _key_issued_to,
    all_countersigned,
    balance_with,
    chat,
    ledger,
    node_id,
    receipts_at,
    stream,
)

PHI = '[[models]]\nname = "phi"\nprovider = "echo"\nprice_in = 500_000\nprice_out = 700_000'


def served_four(alice: Peer, bob: Peer, b: RunningNode) -> None:
    """Bob joins alice, and she serves him four requests, receipted and countersigned."""
    cli("join", invite(alice), "--data-dir", str(bob.path))
    assert wait_for(lambda: answers(b, "llama3", max_tokens=2))
    for tokens in (1, 2, 3):
        chat(b, "llama3", tokens)
    assert wait_for(lambda: len(receipts_at(bob)) == 4 and all_countersigned(alice, bob))


def rows(path: Path, sql: str, *params: object) -> list[tuple]:
    with sqlite3.connect(path / DATABASE_FILE) as db:
        return db.execute(sql, params).fetchall()


def test_a_hostile_peer_cannot_bill_for_requests_never_sent(tmp_path: Path) -> None:
    alice = make_peer(tmp_path, "alice", LLAMA)
    mallory = make_peer(tmp_path, "mallory", PHI)
    bob = make_peer(tmp_path, "bob")
    with alice.run(), mallory.run(), bob.run() as b:
        cli("join", invite(alice), "--data-dir", str(bob.path))
        cli("join", invite(mallory), "--data-dir", str(bob.path))
        cli("join", invite(bob), "--data-dir", str(mallory.path))  # mallory holds a key of bob's
        assert wait_for(lambda: answers(b, "llama3", max_tokens=2) and answers(b, "phi"))
        chat(b, "llama3", 3)
        assert wait_for(lambda: len(receipts_at(bob)) == 3 and all_countersigned(bob))
        before = balance_with(bob, mallory)
        bob_id, mallory_id, alice_id = node_id(bob), node_id(mallory), node_id(alice)
        (to_alice,) = rows(bob.path, "SELECT id FROM receipts WHERE provider = ? LIMIT 1", alice_id)
        (head_seq, head_body) = rows(
            mallory.path,
            "SELECT seq, body FROM receipts WHERE consumer = ? ORDER BY seq DESC LIMIT 1",
            bob_id,
        )[0]
        head = msgspec.json.decode(head_body, type=Receipt)  # bob's real request to her
        real = (head.id, head.price_seq)

        # Mallory's receipts, chained on from her real head so that only the rule refuses them.
        me = NodeIdentity.load(mallory.path / IDENTITY_FILE)
        forged: list = []
        prev = receipt_hash(head)
        for seq, (request_id, model, price_seq, amount) in enumerate(
            [
                ("req_never_sent", "phi", real[1], 900_000),  # a request bob never sent
                (to_alice[0], "phi", real[1], 900_000),  # bob's request to alice
                (real[0] + "x", "phi", real[1], 900_000),  # another id
                (real[0], "llama3", real[1], 1),  # bob's real request to her, other model
                (real[0], "phi", real[1] + 1000, 1),  # an advert seq bob never saw
            ],
            start=head_seq + 1,
        ):
            receipt = make_receipt(
                me.sign,
                id=request_id,
                provider=mallory_id,
                consumer=bob_id,
                key_id="k",
                model=model,
                tokens_in=10_000,
                tokens_out=10_000,
                amount=amount,
                price_seq=price_seq,
                seq=seq,
                prev=prev,
            )
            forged.append(receipt)
            prev = receipt_hash(receipt)
        # Naming alice as provider, signed with mallory's key.
        as_alice = make_receipt(
            me.sign,
            id=to_alice[0],
            provider=alice_id,
            consumer=bob_id,
            key_id="k",
            model="llama3",
            tokens_in=1,
            tokens_out=1,
            amount=2,  # one token each way at alice's prices
            price_seq=1,
            seq=99,
            prev=prev,
        )
        url = b.url + "/federation/receipts"
        key = _key_issued_to(mallory, bob)
        for receipt in [*forged, as_alice]:
            body = msgspec.json.encode({"receipts": [receipt_fields(receipt)]})
            posted = httpx.post(url, content=body, headers=_signed_by(mallory.path, url, body, key))
            assert posted.status_code == 200 and posted.json() == {"taken": 0}
        held = {r[0] for r in rows(bob.path, "SELECT id FROM receipts")}
        assert not held & {"req_never_sent", real[0] + "x"}
        assert len(receipts_at(bob)) == 3
        assert balance_with(bob, mallory) == before

        # Mallory puts them in her own books; bob's reconciliation never imports them.
        with sqlite3.connect(mallory.path / DATABASE_FILE) as db:
            for receipt in forged:
                row = stored(receipt)
                db.execute(
                    "INSERT INTO receipts VALUES (?,?,?,?,?,?,?,?,?,?)",
                    msgspec.structs.astuple(row),
                )
        report = ledger(bob, "reconcile", "mallory")
        assert report["missing_ours"]["count"] == 0  # type: ignore[index]
        assert report["rejected"]["count"] == len(forged)  # type: ignore[index]
        assert len(receipts_at(bob)) == 3
        assert balance_with(bob, mallory) == before
        assert balance_with(mallory, bob)["they_used"] > before["we_used"]

        # She proposes a settlement over them: refused, and bob holds no statement.
        refused = CliRunner().invoke(
            main, ["ledger", "settle", "bob", "--data-dir", str(mallory.path)]
        )
        assert refused.exit_code != 0 and "409" in refused.output
        assert rows(bob.path, "SELECT * FROM settlements") == []


def test_receipts_lost_in_a_crash_come_back_countersigned_and_settle(tmp_path: Path) -> None:
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    with alice.run(), bob.run() as b:
        served_four(alice, bob, b)
        # Bob crashed before keeping two receipts (he had journaled the requests' usage):
        # alice holds them countersigned by no one.
        with sqlite3.connect(bob.path / DATABASE_FILE) as db:
            db.execute("DROP TRIGGER receipts_no_delete")
            db.execute("DELETE FROM receipts WHERE seq IN (2, 3)")
        with sqlite3.connect(alice.path / DATABASE_FILE) as db:
            db.execute("DROP TRIGGER receipts_csig_once")
            db.execute("UPDATE receipts SET csig = NULL WHERE seq IN (2, 3)")
        report = ledger(bob, "reconcile", "alice")
        assert report["missing_ours"]["count"] == 2 and report["rejected"]["count"] == 0  # type: ignore[index]
        # Countersigned on both sides: nothing is left disputed.
        assert all_countersigned(alice, bob) and receipts_at(alice) == receipts_at(bob)
        again = ledger(bob, "reconcile", "alice")
        assert again["disputed"]["count"] == 0 and again["matched"]["count"] == 4  # type: ignore[index]

        statement = ledger(bob, "settle", "alice")
        assert statement["sig_a"] and statement["sig_b"]  # type: ignore[index]


def settled(tmp_path: Path) -> tuple[Peer, Peer, dict]:
    """Alice served bob four requests, and they settled: (alice, bob, the statement)."""
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    with alice.run(), bob.run() as b:
        served_four(alice, bob, b)
        statement = ledger(bob, "settle", "alice")
    assert balance_with(bob, alice)["net"] == 0
    return alice, bob, statement  # type: ignore[return-value]


def verified(peer: Peer) -> tuple[int, list[dict]]:
    result = CliRunner().invoke(main, ["ledger", "verify", "--json", "--data-dir", str(peer.path)])
    return result.exit_code, msgspec.json.decode(result.output)


def test_verify_checks_settlement_statements(tmp_path: Path) -> None:
    _, bob, statement = settled(tmp_path)
    code, checks = verified(bob)
    assert code == 0 and [c["receipts"] for c in checks if c["kind"] == "statement"] == [4]
    altered = dict(statement, b_owes_a=statement["b_owes_a"] + 1, net=statement["net"] - 1)
    with sqlite3.connect(bob.path / DATABASE_FILE) as db:
        db.execute("UPDATE settlements SET body = ?", (msgspec.json.encode(altered).decode(),))
    code, checks = verified(bob)
    (broken,) = [c for c in checks if not c["ok"]]
    assert code == 1 and broken["kind"] == "statement" and "sig_" in broken["problem"]


def test_a_moved_head_never_counts_a_settled_receipt_twice(tmp_path: Path) -> None:
    """A damaged hash column at the settled head (a bad restore, a hand edit): the statement's
    head is still found (hashes are recomputed from bodies), and `verify` names the damage."""
    alice, bob, _ = settled(tmp_path)
    with sqlite3.connect(bob.path / DATABASE_FILE) as db:
        db.execute("DROP TRIGGER receipts_no_rewrite")
        db.execute("UPDATE receipts SET hash = 'damaged' WHERE seq = 4")
    assert balance_with(bob, alice)["net"] == 0 and balance_with(bob, alice)["receipts"] == 0
    code, checks = verified(bob)
    assert code == 1
    assert [c["problem"] for c in checks if not c["ok"]] == [
        "seq 4: the stored hash column is not the hash of its receipt"
    ]


def test_a_hostile_peer_s_receipt_in_its_answer_is_refused(tmp_path: Path) -> None:
    """Mallory's node answers bob's requests but hands back, in the response header or the
    stream's receipt event, receipts that are not for what bob asked: another request id,
    another model, an advert seq she never issued, more than the advertised price. Bob keeps
    none of them (her honest copies of those requests stay hers, for reconciliation)."""
    mallory = make_peer(tmp_path, "mallory", PHI)
    bob = make_peer(tmp_path, "bob")
    app = create_app(mallory.path)
    with serve_app(app, lifespan="on", port=mallory.port), bob.run() as b:
        cli("join", invite(mallory), "--data-dir", str(bob.path))
        assert wait_for(lambda: answers(b, "phi"))
        assert wait_for(lambda: len(receipts_at(bob)) == 1)
        hub = app.state.hub
        honest = hub.receipts.issue
        lies = [
            {"id": "req_invented"},
            {"model": "llama3"},
            {"price_seq": 2**53 - 1},  # beyond any advert seq (they are floored at the clock)
            {"amount": 10**9},
        ]

        async def hostile(settlement, consumer, receipt_id, key_id):  # type: ignore[no-untyped-def]
            signed = parse_receipt(await honest(settlement, consumer, receipt_id, key_id))
            fields = {**receipt_fields(signed), **lies.pop(0)}
            for name in ("v", "sig", "csig", "iat"):
                fields.pop(name)
            return stored(make_receipt(hub.identity.sign, **fields)).body.encode()

        hub.receipts.issue = hostile
        chat(b, "phi", 3)
        stream(b, "phi")
        chat(b, "phi", 4)
        stream(b, "phi")
        assert lies == []
        # She turns honest again: once bob holds that receipt, he has judged the ones before
        # (receipts are taken off the request path, in order).
        hub.receipts.issue = honest
        chat(b, "phi", 2)
        held = f"SELECT seq FROM receipts WHERE provider = '{node_id(mallory)}' ORDER BY seq"
        assert wait_for(lambda: rows(bob.path, held) == [(1,), (6,)])
        (row,) = ledger(bob, "balance")  # type: ignore[misc]
        assert row["receipts"] == 2


def test_a_countersignature_that_is_not_the_consumer_s_over_our_receipt_is_not_kept(
    tmp_path: Path,
) -> None:
    """The provider keeps a countersignature only if it is its consumer's signature over the
    very receipt it issued: bob (acting here by hand, his node not running, so nothing else
    countersigns) posts csigs made by another key, over other bytes, and for another request
    id; alice keeps none of them, then keeps his real one."""
    from ledger.receipts import countersign

    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    with alice.run() as a:
        cli("join", invite(alice), "--data-dir", str(bob.path))
        key = _key_issued_to(bob, alice)
        url = a.url + "/v1/chat/completions"
        body = msgspec.json.encode(
            {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
        )
        answer = httpx.post(url, content=body, headers=_signed_by(bob.path, url, body, key))
        assert answer.status_code == 200
        issued = parse_receipt(b64url_decode(answer.headers["aihub-receipt"]))
        bob_id = NodeIdentity.load(bob.path / IDENTITY_FILE)
        real = countersign(issued, bob_id.sign).csig
        other_key = countersign(issued, NodeIdentity.generate().sign).csig
        other_bytes = countersign(
            msgspec.structs.replace(issued, tokens_out=issued.tokens_out + 1), bob_id.sign
        ).csig
        csig_at = f"SELECT csig FROM receipts WHERE seq = {issued.seq}"

        def post(csig: str, request_id: str = issued.id) -> int:
            target = a.url + "/federation/countersignatures"
            batch = {"csigs": [{"seq": issued.seq, "id": request_id, "csig": csig}]}
            data = msgspec.json.encode(batch)
            sent = httpx.post(target, content=data, headers=_signed_by(bob.path, target, data, key))
            assert sent.status_code == 200, sent.text
            return sent.json()["taken"]

        for forged in (other_key, other_bytes, "A" * 86, "not base64url"):
            assert post(forged) == 0
        assert post(real, request_id="req_another") == 0
        assert rows(alice.path, csig_at) == [(None,)]
        assert post(real) == 1
        assert rows(alice.path, csig_at) == [(real,)]
        assert post(real) == 0  # kept once
