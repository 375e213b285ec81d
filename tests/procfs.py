"""What a served node's processes hold, read from Linux's /proc: its worker processes, and the
TCP sockets each holds on the node's port (listening, or connections it accepted)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx

LISTEN = "0A"  # /proc/net/tcp's state of a listening socket


def workers_of(pid: int) -> list[int]:
    """The worker processes uvicorn's supervisor `pid` spawned (not its resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    found = []
    for child in children:
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"spawn_main" in command:
            found.append(int(child))
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _states(pid: int, port: int) -> Iterator[str]:
    """The state of each TCP socket on local `port` that the process holds (none once it
    has ended: a worker killed is gone from /proc between two reads)."""
    try:
        inodes = _socket_inodes(pid)
        tables = [Path(f"/proc/{pid}/net/{t}").read_text() for t in ("tcp", "tcp6")]
    except (FileNotFoundError, ProcessLookupError):
        return
    for table in tables:
        for row in table.splitlines()[1:]:
            fields = row.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                yield fields[3]


def client_sockets(pid: int, port: int) -> int:
    """How many accepted connections on `port` the process holds (its socket fds whose
    inode is a non-listening TCP socket on that local port)."""
    return sum(1 for state in _states(pid, port) if state != LISTEN)


def listens(pid: int, port: int) -> bool:
    """Whether the process holds a socket listening on `port` (its server has started)."""
    return LISTEN in _states(pid, port)


def listening_workers(
    serve: subprocess.Popen[bytes], port: int, count: int, gone: int | None = None
) -> list[int]:
    """The workers of a real `aihub serve`, once `count` of them listen on the port, none of
    them `gone` (a worker killed, which listens until the kernel has ended it). At the node's
    start a worker listens once its app has started; a replacement listens from its fork
    (its slot's socket, which the parent kept listening), before its app has started."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready = [pid for pid in workers_of(serve.pid) if listens(pid, port)]
        if len(ready) == count and gone not in ready:
            return ready
        time.sleep(0.05)
    raise AssertionError(f"{count} workers never listened on {port}")


def worker_clients(
    stack: ExitStack, url: str, serve: subprocess.Popen[bytes], port: int, each: int = 1
) -> dict[int, list[httpx.Client]]:
    """`each` keep-alive clients connected to every worker of a real `aihub serve` (two), by
    its pid. The kernel picks a new connection's worker: clients are opened (and kept, in
    `stack`, so that the counts only grow) until every worker has `each`; the worker whose
    count of connections grew holds the new one."""
    workers = listening_workers(serve, port, 2)
    held = {pid: client_sockets(pid, port) for pid in workers}
    found: dict[int, list[httpx.Client]] = {pid: [] for pid in workers}
    for _ in range(400):
        client = stack.enter_context(httpx.Client(base_url=url, timeout=60))
        assert client.get("/health/live").status_code == 200
        now = {pid: client_sockets(pid, port) for pid in workers}
        (owner,) = [pid for pid in workers if now[pid] > held[pid]]
        held = now
        if len(found[owner]) < each:
            found[owner].append(client)
        if all(len(clients) == each for clients in found.values()):
            return found
    raise AssertionError(f"never {each} connections on each worker: {held}")
