"""A worker that dies while the node serves (node/gateway/journal.py `adopt_orphans`): the
other workers replay its journal within seconds, so that what it answered is in the usage and
the spend without waiting for the node's next start. Before, its last batch (the answers of
its last 50 ms) was missing from the books, and from its budgets, until then."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from node.gateway.journal import JOURNAL_DIR, Journal, adopt_orphans, left_behind
from node.storage import open_store
from tests.conftest import NodeDir, serve_process
from tests.mocks.server import free_port
from tests.procfs import client_sockets, listening_workers
from tests.test_budgets import make_key, priced_echo, spend_of
from tests.test_federation import wait_for
from tests.test_journal import SCOPE, _usage, charge, load


def _ended_pid() -> int:
    """The pid of a process that has ended and been reaped."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(done.stdout)


def _segment_of(folder: Path, pid: int, request_ids: list[str]) -> Path:
    """A segment as process `pid` would have left it, holding charges for `request_ids`."""
    journal = Journal(folder)
    for request_id in request_ids:
        journal.append(charge(request_id, 7, 7))
    mine = journal._path
    os.close(journal._fd)
    return mine.rename(folder / f"{pid}-1.journal")


def test_only_the_segments_of_ended_processes_are_replayed_and_each_once(tmp_path: Path) -> None:
    folder = tmp_path / JOURNAL_DIR
    folder.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _segment_of(folder, _ended_pid(), ["d1", "d2"])
        living = _segment_of(folder, alive.pid, ["l1"])
        ours = _segment_of(folder, os.getpid(), ["o1"])

        async def run() -> tuple[list[int], set[str], tuple[int, int]]:
            store = await open_store(tmp_path / "db")
            try:
                await store.spend.open_periods([(SCOPE, 0, 10**9)])
                # Two workers looking at once: one replays it, the other finds it claimed.
                counts = await asyncio.gather(*(adopt_orphans(store, folder) for _ in range(2)))
                counts.append(await adopt_orphans(store, folder))  # nothing left to adopt
                (row,) = await store.spend.spend([(SCOPE, 0)])
                ids = {u.request_id for u in await store.usage.usage_since(0)}
                return sorted(counts), ids, (row.spent, row.reserved)
            finally:
                await store.close()

        counts, ids, spend = asyncio.run(run())
    finally:
        alive.kill()
        alive.wait()
    assert counts == [0, 0, 2]
    assert ids == {"d1", "d2"} and spend == (14, 0)
    assert not dead.exists()
    assert living.exists() and ours.exists()  # a live process's, and our own, untouched
    assert {s.path.name for s in left_behind(folder)} == {living.name, ours.name}


def test_a_worker_killed_under_load_loses_no_usage_and_no_spend_while_the_node_serves(
    node_dir: NodeDir, tmp_path: Path
) -> None:
    """Two workers loaded from eight clients, one SIGKILLed after 300 answers (its last batch
    not yet written: checked, else killed again); the node is not restarted, and every answer
    a client got has its usage record within seconds, the key's spend exactly what they
    cost."""
    priced_echo(node_dir)
    node_dir.set_config("latency_ms = 30", "latency_ms = 0")
    key, key_id = make_key(node_dir.path, name="killed", budget_micros=10**12)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    answered: list[str] = []
    stop = threading.Event()
    with serve_process(node_dir.path, port, tmp_path / "serve.log", "--workers", "2") as serve:
        workers = listening_workers(serve, port, 2)
        threads = [threading.Thread(target=load, args=(url, key, answered, stop)) for _ in range(8)]
        for thread in threads:
            thread.start()
        try:
            for _attempt in range(5):
                target = len(answered) + 300
                deadline = time.monotonic() + 30
                while len(answered) < target and time.monotonic() < deadline:
                    time.sleep(0.01)
                victim = max(workers, key=lambda pid: client_sockets(pid, port))
                os.kill(victim, signal.SIGKILL)
                seen = set(answered)
                written, _ = _usage(node_dir, key_id)
                workers = listening_workers(serve, port, 2, gone=victim)
                if seen - written:
                    break
            else:
                raise AssertionError("every kill came just after a batch: the test proves nothing")
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=15)
        assert wait_for(lambda: set(answered) <= _usage(node_dir, key_id)[0], seconds=30)
        assert wait_for(lambda: not list((node_dir.path / JOURNAL_DIR).glob(f"{victim}-*")))
        _, cost = _usage(node_dir, key_id)
        assert spend_of(node_dir.path, f"key:{key_id}")[0] == cost
    assert "replayed" in (tmp_path / "serve.log").read_text()
