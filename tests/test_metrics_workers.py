"""/metrics under several workers (node/gateway/metrics.py): a scrape, whichever worker takes
it, answers what the whole node counted, a worker killed and replaced meanwhile included;
and a node started again counts from zero. Counted in each process's memory, a scrape
answered one worker's share (17 or 23 of 40 requests, alternating)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx

from tests.conftest import NodeDir, serve_process
from tests.mocks.server import free_port
from tests.procfs import client_sockets, listening_workers
from tests.test_metrics_gauges import samples_in

HI = [{"role": "user", "content": "hi"}]
CONNECTIONS = 32  # spread over two workers by the kernel: all on one has a chance of 2**-31
CHAT = (("endpoint", "chat"), ("model", "echo"), ("status", "200"))


# A worker killed is replaced on its own socket, which the parent keeps listening: a
# connection the kernel gives it meanwhile waits in its queue until the replacement has
# started (node/cli/workers.py), seconds on a loaded machine, where httpx gives up after 5.
AFTER_A_KILL = 60


def _scrapes(url: str, count: int = 10, timeout: float = 5) -> Iterator[str]:
    """`count` scrapes, each on a connection of its own (the kernel picks the worker)."""
    for _ in range(count):
        answer = httpx.get(f"{url}/metrics", headers={"connection": "close"}, timeout=timeout)
        assert answer.status_code == 200
        yield answer.text


def _chat(client: httpx.Client) -> int:
    """One chat; the tokens it used."""
    answer = client.post("/v1/chat/completions", json={"model": "echo", "messages": HI})
    assert answer.status_code == 200
    return int(answer.json()["usage"]["total_tokens"])


def _counted(text: str) -> tuple[float, float, float]:
    """Requests, tokens (in and out) and latency observations counted for the echo chats."""
    requests = samples_in(text, "aihub_requests_total").get(CHAT, 0.0)
    tokens = sum(samples_in(text, "aihub_tokens_total").values())
    latency = samples_in(text, "aihub_request_duration_seconds_count")
    return requests, tokens, latency.get((("endpoint", "chat"), ("model", "echo")), 0.0)


def test_every_scrape_counts_every_workers_requests(node_dir: NodeDir, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    auth = {"authorization": f"Bearer {node_dir.key}"}
    with serve_process(node_dir.path, port, tmp_path / "serve.log", "--workers", "2") as serve:
        workers = listening_workers(serve, port, 2)
        with ExitStack() as stack:
            clients = [
                stack.enter_context(httpx.Client(base_url=url, headers=auth))
                for _ in range(CONNECTIONS)
            ]
            tokens = sum(_chat(client) for client in clients)
            held = {pid: client_sockets(pid, port) for pid in workers}
            assert min(held.values()) >= 1, held  # both workers answered some
            tokens += sum(_chat(client) for client in clients)
        asked = 2 * CONNECTIONS
        for text in _scrapes(url):
            assert _counted(text) == (asked, tokens, asked)

        # A worker killed: what it counted stays counted, and its replacement counts on.
        os.kill(workers[0], signal.SIGKILL)
        assert workers[1] in listening_workers(serve, port, 2, gone=workers[0])
        for text in _scrapes(url, 4, AFTER_A_KILL):
            assert _counted(text) == (asked, tokens, asked)
        for _ in range(CONNECTIONS):
            with httpx.Client(base_url=url, headers=auth, timeout=AFTER_A_KILL) as client:
                tokens += _chat(client)
        asked += CONNECTIONS
        for text in _scrapes(url, timeout=AFTER_A_KILL):
            assert _counted(text) == (asked, tokens, asked)

    # Started again, the node counts from zero, as one process does.
    with serve_process(node_dir.path, port, tmp_path / "again.log", "--workers", "2") as serve:
        listening_workers(serve, port, 2)
        for text in _scrapes(url, 4):
            assert _counted(text) == (0, 0, 0)
