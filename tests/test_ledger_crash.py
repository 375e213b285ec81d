"""A provider killed with SIGKILL mid-load loses no receipt of a request it completed, nor the
usage record of one it receipted, and its chains still verify after a restart; the ledger
through the admin API."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import httpx
from click.testing import CliRunner

from node.cli.main import main
from node.config import DATABASE_FILE
from tests.conftest import wait_ready
from tests.test_federation import HI, LLAMA, answers, cli, invite, make_peer, wait_for


def serve(peer, log: Path) -> subprocess.Popen[bytes]:  # type: ignore[no-untyped-def]
    command = [sys.executable, "-m", "node.cli", "serve", "--port", str(peer.port)]
    process = subprocess.Popen(
        [*command, "--data-dir", str(peer.path)],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    wait_ready(f"http://127.0.0.1:{peer.port}", process)  # type: ignore[arg-type]
    return process


def receipt_ids(path: Path) -> set[str]:
    with sqlite3.connect(path / DATABASE_FILE) as db:
        return {row[0] for row in db.execute("SELECT id FROM receipts")}


def served_usage(path: Path) -> int:
    """The usage records of requests the node answered (alice serves bob alone here)."""
    with sqlite3.connect(path / DATABASE_FILE) as db:
        return int(db.execute("SELECT COUNT(*) FROM usage WHERE status = 200").fetchone()[0])


def test_sigkill_loses_no_receipt_of_a_completed_request(tmp_path: Path) -> None:
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    process = serve(alice, tmp_path / "alice.log")
    try:
        with bob.run() as b:
            cli("join", invite(alice), "--data-dir", str(bob.path))
            assert wait_for(lambda: answers(b, "llama3", max_tokens=2))
            completed: list[str] = []
            stop = threading.Event()

            def load() -> None:
                with b.client(timeout=10) as client:
                    while not stop.is_set():
                        body = {"model": "llama3@alice", "messages": HI, "max_tokens": 3}
                        try:
                            response = client.post("/v1/chat/completions", json=body)
                        except httpx.HTTPError:
                            continue
                        if response.status_code == 200:
                            completed.append(response.headers["aihub-request-id"])

            workers = [threading.Thread(target=load) for _ in range(8)]
            for worker in workers:
                worker.start()
            assert wait_for(lambda: len(completed) >= 150, seconds=30)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
            stop.set()
            for worker in workers:
                worker.join(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
    # Every request bob saw answered has its receipt at alice, and her chain is whole.
    assert set(completed) <= receipt_ids(alice.path)
    verified = CliRunner().invoke(main, ["ledger", "verify", "--data-dir", str(alice.path)])
    assert verified.exit_code == 0, verified.output
    # After a restart she serves on, continuing the same chain; and every request she
    # receipted has its usage record: journaled before its receipt, replayed at the start.
    process = serve(alice, tmp_path / "alice2.log")
    try:
        assert served_usage(alice.path) >= len(receipt_ids(alice.path)) >= len(completed)
        with bob.run() as b:
            assert wait_for(lambda: answers(b, "llama3@alice", max_tokens=2))
        verified = CliRunner().invoke(main, ["ledger", "verify", "--data-dir", str(alice.path)])
        assert verified.exit_code == 0, verified.output
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_the_ledger_through_the_admin_api(tmp_path: Path) -> None:
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    with alice.run() as a, bob.run() as b:
        cli("join", invite(alice), "--data-dir", str(bob.path))
        assert wait_for(lambda: answers(b, "llama3", max_tokens=2))
        for _ in range(3):
            assert answers(b, "llama3", max_tokens=4)
        with a.client() as admin_a, b.client() as admin_b:
            assert wait_for(
                lambda: len(admin_b.get("/admin/ledger/export?format=json").json()) == 4
            )
            (mine,) = admin_b.get("/admin/ledger/balance").json()
            (theirs,) = admin_a.get("/admin/ledger/balance").json()
            assert mine["we_used"] == theirs["they_used"] > 0 and mine["net"] == -theirs["net"]
            assert admin_a.get("/admin/ledger/verify").json()["ok"] is True
            report = admin_b.post("/admin/ledger/reconcile/alice").json()
            assert report["matched"]["count"] == 4 and report["missing_ours"]["count"] == 0
            statement = admin_b.post("/admin/ledger/settle/alice").json()
            assert statement["sig_a"] and statement["sig_b"]
            assert admin_a.get("/admin/ledger/statements").json()["statements"] == [statement]
            plan = admin_a.post("/admin/ledger/net", json={}).json()
            assert len(plan["transfers"]) == 1
            (transfer,) = plan["transfers"]
            assert transfer[2] == mine["we_used"]
            csv_lines = admin_a.get("/admin/ledger/export?format=csv").text.splitlines()
            assert len(csv_lines) == 5
            # Bad input: clear errors, nothing changed.
            assert admin_b.post("/admin/ledger/reconcile/nobody").status_code == 404
            assert admin_b.get("/admin/ledger/export?format=xml").status_code == 400
            assert admin_b.post("/admin/ledger/net", content=b"[1").status_code == 400
            forged = dict(statement, iat=statement["iat"] - 1)
            refused = admin_b.post("/admin/ledger/net", json={"statements": [forged]})
            assert refused.status_code == 400 and "signature" in refused.json()["error"]["message"]
        # Only the admin key.
        user = cli("keys", "create", "--name", "u", "--json", "--data-dir", str(bob.path))
        import json

        key = json.loads(user)["key"]
        denied = httpx.get(
            b.url + "/admin/ledger/balance", headers={"authorization": f"Bearer {key}"}
        )
        assert denied.status_code == 403
