"""The garbage collector of a served node (node/collector.py): what startup made is frozen out
of the collector's walks in every worker, the counts are in /metrics (one process's, so with
one worker only), an app built inside a
test's process is left alone, and garbage with cycles is still collected after the change."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from litestar.testing import TestClient

from node.app import create_app
from tests.conftest import NodeDir, serve_process
from tests.mocks.server import free_port
from tests.test_metrics_gauges import samples_in

# A started node holds far more than this; a worker that did not freeze reports 0.
STARTUP_OBJECTS = 10_000


@pytest.mark.parametrize("workers", [1, 2])
def test_every_served_worker_freezes_what_startup_made(
    node_dir: NodeDir, tmp_path: Path, workers: int
) -> None:
    port = free_port()
    with serve_process(node_dir.path, port, tmp_path / "serve.log", "--workers", str(workers)):
        # Each scrape on a new connection, which the kernel hands to either worker.
        for _ in range(10 * workers):
            answer = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"connection": "close"})
            assert answer.status_code == 200
            (frozen,) = samples_in(answer.text, "aihub_gc_frozen_objects").values()
            assert frozen > STARTUP_OBJECTS
            collections = samples_in(answer.text, "python_gc_collections_total")
            if workers == 1:
                assert set(collections) == {(("generation", str(g)),) for g in (0, 1, 2)}
            else:
                # One process's counts, which a scrape of any worker would show in turn: left
                # out under several workers (node/gateway/metrics.py), as prometheus_client does.
                assert collections == {}


def test_an_app_in_the_tests_own_process_is_left_alone(node_dir: NodeDir) -> None:
    before = (gc.get_freeze_count(), gc.get_threshold())
    with TestClient(create_app(node_dir.path)) as client:
        assert client.get("/health/live").status_code == 200
        assert (gc.get_freeze_count(), gc.get_threshold()) == before


def test_cycles_made_after_settling_are_still_collected() -> None:
    # In a process of its own: settling changes the whole interpreter's collector.
    program = """
import gc, weakref
from node.collector import settle_collector, YOUNG_THRESHOLD
settle_collector()
class Node:
    pass
gone = []
def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    weakref.finalize(a, gone.append, 1)
for _ in range(100):
    cycle()
# Enough new containers to pass the young threshold several times, no explicit collect.
kept = [[i] for i in range(YOUNG_THRESHOLD * 3)]
print(len(gone))
"""
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True, timeout=60
    )
    assert int(done.stdout) == 100
