"""A client that goes away at a chosen moment rather than after a timeout: it POSTs on a
connection of its own and closes it once `until()` holds (the upstream has the request, say).
A client timeout instead races the node: on a loaded machine the node may not have reached
its upstream when the client leaves, and the test then fails while the node behaves."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import httpx


def post_then_hang_up(
    url: str, headers: dict[str, str], body: bytes, until: Callable[[], bool]
) -> None:
    """POST `body` to `url` and close the connection once `until()` is true (within 30 s)."""
    target = httpx.URL(url)
    lines = [f"POST {target.raw_path.decode()} HTTP/1.1", f"host: {target.host}:{target.port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"content-length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    with socket.create_connection((target.host, target.port)) as connection:
        connection.sendall(head + body)
        deadline = time.monotonic() + 30
        while not until():
            assert time.monotonic() < deadline, "the moment to hang up never came"
            time.sleep(0.01)
