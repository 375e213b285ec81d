"""The usage journal: batched usage writes that lose nothing when the node is killed, and a
replay that counts every request's spend exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from node.config import DATABASE_FILE
from node.gateway import journal as journal_module
from node.gateway.journal import JOURNAL_DIR, Journal, left_behind, read_segment, replay
from node.storage import open_store
from node.storage.base import Store
from node.storage.records import Charge, Hold
from tests.conftest import NodeDir, wait_ready
from tests.test_budgets import make_key, priced_echo, spend_of
from tests.test_storage import charge as usage_of

SCOPE = "key:k1"


def charge(request_id: str, cost: int, hold: int) -> Charge:
    return usage_of(request_id, cost, [Hold(SCOPE, 0, hold)])


def test_segments_hold_what_was_appended_until_committed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(journal_module, "SEGMENT_BYTES", 1)  # a new segment at every batch
    journal = Journal(tmp_path / "j")
    first = [charge(f"a{n}", n, n) for n in range(3)]
    for s in first:
        journal.append(s)
    journal.seal()
    journal.append(charge("b", 1, 1))
    segments = left_behind(tmp_path / "j")
    assert [s.charges for s in segments] == [first, [charge("b", 1, 1)]]
    journal.committed()  # the first batch is in the database: its segment goes
    assert [s.charges for s in left_behind(tmp_path / "j")] == [[charge("b", 1, 1)]]
    journal.seal()
    journal.committed()
    journal.close()
    assert list((tmp_path / "j").iterdir()) == []  # a clean stop leaves nothing to replay


def test_a_small_segment_stays_open_across_batches_and_goes_at_a_clean_stop(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path / "j")
    journal.append(charge("a", 1, 1))
    journal.seal()
    journal.committed()
    journal.append(charge("b", 1, 1))
    # One file still: a replay would skip "a" (already written) and write "b".
    assert [s.charges for s in left_behind(tmp_path / "j")] == [
        [charge("a", 1, 1), charge("b", 1, 1)]
    ]
    journal.seal()
    journal.committed()
    journal.close()
    assert list((tmp_path / "j").iterdir()) == []


def test_a_torn_or_corrupt_tail_ends_the_segment_and_keeps_what_came_before(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path / "j")
    kept = [charge(f"r{n}", 1, 1) for n in range(4)]
    for s in kept:
        journal.append(s)
    journal.append(charge("torn", 1, 1))
    (path,) = (tmp_path / "j").iterdir()
    whole = path.read_bytes()
    path.write_bytes(whole[:-3])  # the last write cut short
    assert list(read_segment(path)) == kept
    flipped = bytearray(whole)
    flipped[-1] ^= 0xFF  # the last record damaged
    path.write_bytes(bytes(flipped))
    assert list(read_segment(path)) == kept


async def _spend(store: Store) -> tuple[int, int]:
    (row,) = await store.spend.spend([(SCOPE, 0)])
    return row.spent, row.reserved


@settings(max_examples=40, deadline=None)
@given(
    costs=st.lists(st.tuples(st.integers(0, 500), st.integers(0, 500)), min_size=1, max_size=20),
    written=st.data(),
)
def test_replay_counts_each_request_once_whatever_was_already_written(
    tmp_path_factory, costs: list[tuple[int, int]], written: st.DataObject
) -> None:
    """A crash may come before a batch's commit or after it (before its segment is deleted):
    replaying the journal over either state gives the spend of every request, counted once."""
    folder = tmp_path_factory.mktemp("replay")
    charges = [charge(f"r{n}", cost, hold) for n, (cost, hold) in enumerate(costs)]
    committed = written.draw(st.integers(0, len(charges)), label="committed before crash")

    async def run() -> None:
        store = await open_store(folder / "db")
        try:
            await store.spend.open_periods([(SCOPE, 0, 10**9)])
            await store.spend.reserve(sum(hold for _, hold in costs), [(SCOPE, 0)])
            journal = Journal(folder / JOURNAL_DIR)
            for s in charges:
                journal.append(s)
            await store.usage.write_batch(charges[:committed], [])
            # The process dies here: the journal is not closed, its segment stays.
            await store.spend.release_all_reservations()  # what `serve` does first on restart
            assert await replay(store, left_behind(folder / JOURNAL_DIR)) == len(charges)
            assert await _spend(store) == (sum(cost for cost, _ in costs), 0)
            assert {u.request_id for u in await store.usage.usage_since(0)} == {
                s.record.request_id for s in charges
            }
            assert left_behind(folder / JOURNAL_DIR) == []
        finally:
            await store.close()

    asyncio.run(run())


def _serve(node: NodeDir, port: int, log: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "node.cli", "serve", "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--data-dir", str(node.path)],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    wait_ready(f"http://127.0.0.1:{port}", process)
    return process


def _usage(node: NodeDir, key_id: str) -> tuple[set[str], int]:
    """The key's usage records in the database, and what they cost together."""
    with sqlite3.connect(node.path / DATABASE_FILE) as db:
        rows = db.execute("SELECT request_id, cost_micros FROM usage WHERE key_id = ?", (key_id,))
        records = rows.fetchall()
    return {row[0] for row in records}, sum(row[1] for row in records)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load(url: str, key: str, answered: list[str], stop: threading.Event) -> None:
    """One client's chats, one after another until `stop`: the request id of each answered
    (a connection the node dropped is followed by a new one)."""
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"}) as client:
        while not stop.is_set():
            try:
                response = client.post("/v1/chat/completions", json=body)
            except httpx.HTTPError:
                continue
            if response.status_code == 200:
                answered.append(response.headers["aihub-request-id"])


def _kill_under_load(node_dir: NodeDir, key: str, port: int, log: Path) -> set[str]:
    """Serve the node, load it from six clients, SIGKILL it after 300 answers: the ids of
    every answer a client got before the kill."""
    answered: list[str] = []
    stop = threading.Event()
    url = f"http://127.0.0.1:{port}"
    process = _serve(node_dir, port, log)
    threads = [threading.Thread(target=load, args=(url, key, answered, stop)) for _ in range(6)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while len(answered) < 300 and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        return set(answered)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
        if process.poll() is None:
            process.kill()


def test_sigkill_under_load_loses_no_usage_and_no_spend(node_dir: NodeDir, tmp_path: Path) -> None:
    """Killed mid-load, the node has not yet written its last answers' usage to the database
    (the writer batches every 50 ms); after a restart every answered request has its usage
    record, and the key's spend is exactly what its records cost."""
    priced_echo(node_dir)
    node_dir.set_config("latency_ms = 30", "latency_ms = 0")
    key, key_id = make_key(node_dir.path, name="killed", budget_micros=10**12)
    port = _free_port()
    seen: set[str] = set()
    # A kill that lands just after a batch was written proves nothing: kill again (the restart
    # replays the first kill's journal, which the end checks too).
    for attempt in range(5):
        seen |= _kill_under_load(node_dir, key, port, tmp_path / f"killed-{attempt}.log")
        assert len(seen) >= 300
        written, _ = _usage(node_dir, key_id)
        if seen - written:
            break
    else:
        raise AssertionError("every kill came just after a batch: the test proves nothing")
    assert os.listdir(node_dir.path / JOURNAL_DIR)

    process = _serve(node_dir, port, tmp_path / "restarted.log")
    try:
        recorded, cost = _usage(node_dir, key_id)
        assert seen <= recorded
        assert spend_of(node_dir.path, f"key:{key_id}") == (cost, 0)
    finally:
        process.terminate()
        process.wait(timeout=15)
    assert "replayed" in (tmp_path / "restarted.log").read_text()
