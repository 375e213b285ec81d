"""Several workers share a burst of new connections (node/cli/workers.py): with one socket
shared by every worker, the first to wake accepted every connection queued by then, and a
client's pool of keep-alive connections could all land on one worker while the other idled.
And a second node started on a port the first serves is refused, not handed half of it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import NodeDir, serve_process
from tests.mocks.server import free_port
from tests.procfs import client_sockets, listening_workers

CONNECTIONS = 32
# Spread by the kernel's hash, fewer than this many of 32 on one of two workers has a chance
# of about 1 in 50,000; a burst that one worker took whole leaves the other none.
AT_LEAST = 5


@contextmanager
def _stopped(pids: list[int]) -> Iterator[None]:
    """The workers stopped, so that connections made meanwhile wait, queued by the kernel,
    until both run again: as a burst of connections arriving at once does."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def test_a_burst_of_connections_is_spread_over_the_workers(
    node_dir: NodeDir, tmp_path: Path
) -> None:
    port = free_port()
    with serve_process(node_dir.path, port, tmp_path / "serve.log", "--workers", "2") as serve:
        workers = listening_workers(serve, port, 2)
        with _stopped(workers):
            clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(CONNECTIONS)]
        try:
            for client in clients:
                client.sendall(b"GET /health/live HTTP/1.1\r\nhost: node\r\n\r\n")
            for client in clients:
                assert client.recv(65536).startswith(b"HTTP/1.1 200")
            held = {pid: client_sockets(pid, port) for pid in workers}
        finally:
            for client in clients:
                client.close()
    assert sum(held.values()) == CONNECTIONS
    assert min(held.values()) >= AT_LEAST, held


def test_a_second_node_on_a_port_in_use_is_refused(node_dir: NodeDir, tmp_path: Path) -> None:
    # Another node (a copy in a folder of its own), started by mistake on the same port.
    other = tmp_path / "other"
    shutil.copytree(node_dir.path, other)
    port = free_port()
    with serve_process(node_dir.path, port, tmp_path / "serve.log", "--workers", "2"):
        command = [sys.executable, "-m", "node.cli", "serve", "--port", str(port)]
        second = subprocess.run(
            [*command, "--workers", "2", "--data-dir", str(other)],
            capture_output=True,
            timeout=120,
        )
    assert second.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in second.stderr.decode()
