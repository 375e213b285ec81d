"""docs/deploy.md's backup and restore, followed as written with a real `aihub serve`: a
provider restored from a backup older than its peer's books is not suspended, learns its chain
head (and the statement it lost) from the peer before it issues again, traffic resumes, and
`ledger verify` is clean on both sides."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import httpx
import msgspec
from click.testing import CliRunner

from node.cli.main import main
from node.config import CONFIG_FILE, DATABASE_FILE, IDENTITY_FILE
from tests.conftest import RunningNode
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
from tests.test_ledger_crash import serve
from tests.test_ledger_nodes import (
    MISTRAL,
    _key_issued_to,
    all_countersigned,
    balance_with,
    chat,
    ledger,
    receipts_at,
)
from tests.test_ledger_settle import statements_of

DOCS = Path(__file__).parent.parent / "docs" / "deploy.md"
DOCS_DATA_DIR = "/data"  # in the documented Docker backup command
DOCS_DATA_FOLDER = "/var/lib/aihub"  # in the documented restore commands


def _section(start: str, end: str) -> str:
    text = DOCS.read_text()
    return text[text.index(start) : text.index(end)]


def backup_as_documented(node: Path, to: Path) -> None:
    """The documented online backup without the `sqlite3` program: Python's sqlite3 module."""
    (code,) = re.findall(r'python -c "(.*?)"', _section("## Backups", "To restore"))
    code = code.replace(f"{DOCS_DATA_DIR}/backup.db", str(to))
    code = code.replace(DOCS_DATA_DIR, str(node))
    subprocess.run([sys.executable, "-c", code], check=True)


def restore_as_documented(node: Path, saved: Path) -> None:
    """Put identity.key, config.toml and the backup (renamed aihub.db) into the data folder,
    remove any stale -wal and -shm, mode 0600."""
    for name in (IDENTITY_FILE, CONFIG_FILE):
        shutil.copy(saved / name, node / name)
    # Copied into the folder, then renamed: a new file, as `mv` gives.
    shutil.copy(saved / "backup.db", node / "backup.db")
    os.replace(node / "backup.db", node / DATABASE_FILE)
    for stale in (f"{DATABASE_FILE}-wal", f"{DATABASE_FILE}-shm"):
        (node / stale).unlink(missing_ok=True)
    for name in (IDENTITY_FILE, CONFIG_FILE, DATABASE_FILE):
        (node / name).chmod(0o600)


def documented_restore_commands(node: Path, peer: str) -> list[list[str]]:
    """The `aihub …` commands the restore section says to run, for this data folder and peer."""
    block = re.search(r"```sh\n(.*?)```", _section("To restore", "## Upgrading"), re.S)
    assert block is not None
    commands = []
    for line in block.group(1).splitlines():
        words = shlex.split(line)
        args = words[words.index("/opt/aihub/bin/aihub") + 1 :]
        args = [str(node) if w == DOCS_DATA_FOLDER else w for w in args]
        commands.append([peer if w == "hub-peer-one" else w for w in args])
    assert [c[:2] for c in commands] == [["ledger", "reconcile"], ["ledger", "verify"]]
    return commands


def advert_seq_held(peer: Peer) -> int:
    """The seq of the advert `peer` holds from its one peer."""
    with closing(sqlite3.connect(peer.path / DATABASE_FILE)) as db:
        (advert,) = db.execute("SELECT advert FROM peers").fetchone()
    return msgspec.json.decode(advert)["seq"]


def equivocations(peer: Peer) -> list[tuple]:
    with sqlite3.connect(peer.path / DATABASE_FILE) as db:
        return db.execute("SELECT provider, consumer, seq FROM equivocations").fetchall()


def statuses(peer: Peer) -> list[str]:
    listed = cli("peers", "list", "--all", "--json", "--data-dir", str(peer.path))
    return [p["status"] for p in msgspec.json.decode(listed)]


def test_a_provider_restored_from_a_backup_is_not_suspended(tmp_path: Path) -> None:
    alice = make_peer(tmp_path, "alice", LLAMA)  # the provider, restored later
    bob = make_peer(tmp_path, "bob")  # only consumes: alice holds no key of his
    saved = tmp_path / "backups"
    saved.mkdir()
    process = serve(alice, tmp_path / "alice-1.log")
    try:
        with bob.run() as b:
            cli("join", invite(alice), "--data-dir", str(bob.path))
            assert wait_for(lambda: answers(b, "llama3", max_tokens=3))
            for tokens in (1, 2):
                chat(b, "llama3", tokens)
            assert wait_for(lambda: len(receipts_at(bob)) == 3 and all_countersigned(alice, bob))

            # The nightly backup, while alice runs.
            backup_as_documented(alice.path, saved / "backup.db")
            for name in (IDENTITY_FILE, CONFIG_FILE):
                shutil.copy(alice.path / name, saved / name)

            # An upgrade restarts alice after the backup (a new advert seq), then more
            # traffic: receipts 4-6, a settlement, and receipts 7-8.
            process.terminate()
            process.wait(timeout=15)
            process = serve(alice, tmp_path / "alice-upgraded.log")
            assert wait_for(lambda: answers(b, "llama3@alice", max_tokens=2), seconds=30)
            for tokens in (3, 4):
                chat(b, "llama3", tokens)
            assert wait_for(lambda: len(receipts_at(bob)) == 6 and all_countersigned(alice, bob))
            first = ledger(bob, "settle", "alice")
            for tokens in (6, 7):
                chat(b, "llama3", tokens)
            assert wait_for(lambda: len(receipts_at(bob)) == 8 and all_countersigned(alice, bob))
            held_by_bob = receipts_at(bob)
            advert_before = advert_seq_held(bob)

            # Alice's disk dies: stop, restore, start.
            process.terminate()
            process.wait(timeout=15)
            restore_as_documented(alice.path, saved)
            assert len(receipts_at(alice)) == 3 and statements_of(alice) == []
            process = serve(alice, tmp_path / "alice-2.log")
            # Bob's requests come as soon as alice is back, before her admin runs anything:
            # her next receipts continue the chain bob holds.
            assert wait_for(lambda: answers(b, "llama3@alice", max_tokens=2), seconds=30)
            assert wait_for(lambda: len(receipts_at(bob)) == 9)
            for command in documented_restore_commands(alice.path, "bob"):
                result = CliRunner().invoke(main, command)
                assert result.exit_code == 0, result.output
            assert "BROKEN" not in result.output

            # Bob takes alice's new advert: its seq is above the one he saw after the upgrade.
            assert wait_for(lambda: advert_seq_held(bob) > advert_before, seconds=15)

            # Traffic goes on.
            chat(b, "llama3@alice", 8)
            assert wait_for(lambda: len(receipts_at(bob)) == 10 and all_countersigned(alice, bob))
            assert receipts_at(bob)[:8] == held_by_bob
            assert receipts_at(alice) == receipts_at(bob)

            # No one was suspended, no equivocation recorded, both ledgers verify.
            assert statuses(alice) == statuses(bob) == ["active"]
            assert equivocations(alice) == equivocations(bob) == []
            for peer in (alice, bob):
                assert all(check["ok"] for check in ledger(peer, "verify"))  # type: ignore[union-attr]

            # The statement the backup lost is back, and the pair settles on from it.
            assert statements_of(alice) == [first]
            second = ledger(alice, "settle", "bob")
            assert second["from_seq"] == first["to_seq"] + 1  # type: ignore[index]
            assert statements_of(alice) == statements_of(bob) == [first, second]
            assert balance_with(alice, bob)["net"] == balance_with(bob, alice)["net"] == 0
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_a_peer_whose_chain_cannot_be_re_synced_is_not_issued_receipts(tmp_path: Path) -> None:
    """Mallory joined alice, but alice cannot reach the URL mallory gave (say, it sits behind
    NAT). Alice serves it as any peer while her database is the one she ran on; restored from
    a backup, she refuses to serve it (503, retry) rather than sign a receipt from a head she
    could not check against mallory's copy."""
    alice = make_peer(tmp_path, "alice", LLAMA)
    mallory = make_peer(tmp_path, "mallory")  # never started: its URL answers nothing
    saved = tmp_path / "backups"
    saved.mkdir()
    body = msgspec.json.encode({"model": "llama3", "messages": HI, "max_tokens": 2})

    def ask(a: RunningNode) -> httpx.Response:
        url = a.url + "/v1/chat/completions"
        return httpx.post(url, content=body, headers=_signed_by(mallory.path, url, body, key))

    with alice.run() as a:
        cli("join", invite(alice), "--data-dir", str(mallory.path))
        key = _key_issued_to(mallory, alice)
        assert ask(a).status_code == 200
        assert wait_for(lambda: len(receipts_at(alice)) == 1)
        backup_as_documented(alice.path, saved / "backup.db")
        for name in (IDENTITY_FILE, CONFIG_FILE):
            shutil.copy(alice.path / name, saved / name)
        assert ask(a).status_code == 200  # receipt 2: mallory holds it, the backup does not
        assert wait_for(lambda: len(receipts_at(alice)) == 2)
    with alice.run() as a:  # a restart is no restore: still served
        assert ask(a).status_code == 200
        assert wait_for(lambda: len(receipts_at(alice)) == 3)
    restore_as_documented(alice.path, saved)
    with alice.run() as a:
        answer = ask(a)
        assert answer.status_code == 503, answer.text
        error = answer.json()["error"]
        assert error["code"] == "ledger_not_synced" and answer.headers["retry-after"]
        # Asked again, still refused (at once, without another attempt timing out).
        again = ask(a)
        assert again.status_code == 503 and again.json()["error"]["code"] == "ledger_not_synced"
        assert len(receipts_at(alice)) == 1  # the backup's one; nothing issued since
        # Nothing was reserved against mallory's cap since the restore.
        with closing(sqlite3.connect(alice.path / DATABASE_FILE)) as db:
            assert db.execute("SELECT COALESCE(SUM(reserved), 0) FROM spend").fetchone() == (0,)
    with alice.run() as a:  # and a restart does not forget that the restore is pending
        assert ask(a).status_code == 503


def test_a_node_restored_on_both_sides_of_a_pair_is_not_suspended(tmp_path: Path) -> None:
    """Alice provides llama3 to bob and consumes bob's mistral; restored from a backup, she
    lacks receipts of both chains and a statement. Traffic both ways resumes at once, the
    documented commands recover the rest, and both books agree and verify."""
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob", MISTRAL)
    saved = tmp_path / "backups"
    saved.mkdir()
    process = serve(alice, tmp_path / "alice-1.log")
    a = RunningNode(alice.dir, f"http://127.0.0.1:{alice.port}")
    try:
        with bob.run() as b:
            cli("join", invite(alice), "--data-dir", str(bob.path))
            cli("join", invite(bob), "--data-dir", str(alice.path))
            assert wait_for(lambda: answers(b, "llama3", max_tokens=2), seconds=20)
            assert wait_for(lambda: answers(a, "mistral", max_tokens=2), seconds=20)

            def both_ways(count: int) -> None:
                for tokens in range(1, count + 1):
                    chat(b, "llama3", tokens)
                    chat(a, "mistral", tokens)

            def agreed(total: int) -> bool:
                return len(receipts_at(bob)) == len(
                    receipts_at(alice)
                ) == total and all_countersigned(alice, bob)

            both_ways(2)
            assert wait_for(lambda: agreed(6), seconds=15)
            backup_as_documented(alice.path, saved / "backup.db")
            for name in (IDENTITY_FILE, CONFIG_FILE):
                shutil.copy(alice.path / name, saved / name)
            both_ways(2)
            assert wait_for(lambda: agreed(10), seconds=15)
            first = ledger(bob, "settle", "alice")
            both_ways(1)
            assert wait_for(lambda: agreed(12), seconds=15)
            held_by_bob = receipts_at(bob)

            process.terminate()
            process.wait(timeout=15)
            restore_as_documented(alice.path, saved)
            assert len(receipts_at(alice)) == 6
            process = serve(alice, tmp_path / "alice-2.log")
            # Both directions at once, before anyone runs a command.
            assert wait_for(lambda: answers(b, "llama3@alice", max_tokens=2), seconds=30)
            assert wait_for(lambda: answers(a, "mistral@bob", max_tokens=2), seconds=30)
            for command in documented_restore_commands(alice.path, "bob"):
                result = CliRunner().invoke(main, command)
                assert result.exit_code == 0, result.output
            both_ways(1)

            assert wait_for(lambda: agreed(16), seconds=20), (receipts_at(alice), held_by_bob)
            assert set(held_by_bob) <= set(receipts_at(bob)) and receipts_at(alice) == receipts_at(
                bob
            )
            assert statuses(alice) == statuses(bob) == ["active"]
            assert equivocations(alice) == equivocations(bob) == []
            for peer in (alice, bob):
                assert all(check["ok"] for check in ledger(peer, "verify"))  # type: ignore[union-attr]
            assert statements_of(alice) == statements_of(bob) == [first]
            second = ledger(alice, "settle", "bob")
            assert statements_of(alice) == statements_of(bob) == [first, second]
            assert balance_with(alice, bob)["net"] == balance_with(bob, alice)["net"] == 0
    finally:
        process.terminate()
        process.wait(timeout=15)
