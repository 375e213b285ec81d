"""A TCP relay on loopback that a test can cut and restore: a process that reaches a server
through it is cut off from that server while the test, connecting directly, is not (a
partition, which an outage of the server itself cannot make: the test could not reach it
either). While cut, the relay's connections are closed and new ones closed as they come."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Relay:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._cut = False
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def cut(self) -> None:
        """Close every relayed connection now, and each new one as it comes."""
        with self._lock:
            self._cut = True
            for sock in self._open:
                _shut(sock)  # wakes its pair's thread, which closes both

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self.cut()
        _shut(self._listener)  # wakes the accepting thread (Linux: accept fails)
        for thread in list(self._threads):
            thread.join()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._cut:
                    client.close()
                    continue
                try:
                    upstream = socket.create_connection(("127.0.0.1", self.target_port))
                except OSError:
                    client.close()
                    continue
                self._open.update((client, upstream))
                thread = threading.Thread(target=self._pipe, args=(client, upstream), daemon=True)
                self._threads.append(thread)
            thread.start()

    def _pipe(self, client: socket.socket, upstream: socket.socket) -> None:
        """Copy both ways until either side ends (or the relay is cut), then close both."""
        other = {client: upstream, upstream: client}
        with selectors.DefaultSelector() as selector, client, upstream:
            for sock in other:
                selector.register(sock, selectors.EVENT_READ)
            try:
                while True:
                    for key, _ in selector.select():
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                        if not data:
                            return
                        other[key.fileobj].sendall(data)  # type: ignore[index]
            except OSError:
                return
            finally:
                with self._lock:
                    self._open.difference_update(other)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


@contextmanager
def relay_to(port: int) -> Iterator[Relay]:
    """A relay to 127.0.0.1:`port`, closed on leaving."""
    relay = Relay(port)
    try:
        yield relay
    finally:
        relay.close()
