"""Several worker processes, each listening on a socket of its own.

uvicorn's supervisor gives every worker the one socket the parent bound, and the first worker
to wake accepts every connection queued by then: a burst of new keep-alive connections (a
client's pool opening, wrk's 32) lands mostly on one worker, 29 of 32 in one count
(bench/README.md, "Unpinned results, 2026-12-02 05:02 UTC"). That worker is the bottleneck
while the other idles, for as long as the connections are kept. Here each worker slot has a
socket of its own, all bound to the same address with `SO_REUSEPORT`, and the kernel spreads
new connections over them by their addresses' hash.

A socket that nobody accepts from would hold its share of connections unanswered, so each
socket belongs to one slot for the node's life: the parent keeps it open, a worker that dies
is replaced on its slot's socket (what arrived meanwhile waits in its queue), and the signals
with which uvicorn adds, removes or restarts workers (TTIN, TTOU, HUP) are refused rather than
leave a socket without a worker. Only processes of the node's own user can bind the same
address with `SO_REUSEPORT` (the kernel's rule), and those can read the data folder anyway.
"""

from __future__ import annotations

import logging
import socket

from uvicorn.config import STARTUP_FAILURE, Config
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from node.cli.server import LoggedWorker

log = logging.getLogger("uvicorn.error")


def listening_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` sockets bound to `host:port` with `SO_REUSEPORT`, for the workers to listen on
    (each worker's server calls `listen`). OSError if the address is taken, even by sockets
    that would share it: a second node started on the same port must not quietly take half
    of the first one's connections."""
    family = refuse_taken(host, port)
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.set_inheritable(True)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def refuse_taken(host: str, port: int) -> socket.AddressFamily:
    """OSError if a socket already holds `host:port`; else the address's family. Without
    SO_REUSEPORT, a bind is refused while any socket holds the address, even sockets that
    would share it with one another."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    return family


class SpreadWorkers(Multiprocess):
    """uvicorn's supervisor (health checks, replacing a dead worker, stopping on INT and
    TERM), with worker `i` always on socket `i`."""

    def __init__(self, config: Config, sockets: list[socket.socket]) -> None:
        assert len(sockets) == config.workers
        super().__init__(config, sockets)

    def _start(self, slot: int) -> Process:
        process = LoggedWorker(self.config, [self.sockets[slot]])
        process.start()
        return process

    def init_processes(self) -> None:
        self.processes = [self._start(slot) for slot in range(len(self.sockets))]

    def keep_subprocess_alive(self) -> None:
        """As uvicorn's, but a worker is replaced on its own slot's socket."""
        for slot, process in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()  # hung, or dead already
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                # It failed before serving (the app, the store, the socket): every
                # replacement would fail the same way.
                log.error("Child process [%s] failed to start, stopping.", process.pid)
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return  # stopping: it died with the others
            log.info("Child process [%s] died", process.pid)
            self.processes[slot] = self._start(slot)

    def _refuse(self, signal_name: str) -> None:
        log.warning(
            "Received %s: aihub keeps a socket per worker, so it does not add, remove or "
            "restart workers on a signal; restart the node instead.",
            signal_name,
        )

    def handle_hup(self) -> None:
        self._refuse("SIGHUP")

    def handle_ttin(self) -> None:
        self._refuse("SIGTTIN")

    def handle_ttou(self) -> None:
        self._refuse("SIGTTOU")
