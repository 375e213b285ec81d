"""Run an ASGI app on a real loopback port in a background thread, for tests and benchmarks."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn


def free_socket(port: int = 0) -> socket.socket:
    # IPPROTO_TCP, not 0: asyncio enables TCP_NODELAY only on sockets that say they are TCP,
    # and without it Nagle's algorithm adds ~40 ms to every small response.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


def free_port() -> int:
    with free_socket() as sock:
        return sock.getsockname()[1]


@contextmanager
def serve_app(
    app: Any,
    *,
    lifespan: str = "off",
    port: int = 0,
    sock: socket.socket | None = None,
    http: Any = "auto",
) -> Iterator[str]:
    """Serve `app` on 127.0.0.1 at `port` (default: a free one), or on `sock` (a socket the
    caller bound earlier, `free_socket`), with uvicorn's `http` protocol (a name or a
    protocol class); yield its base URL; stop it afterwards."""
    sock = sock or free_socket(port)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        lifespan=lifespan,
        log_level="warning",
        loop="asyncio",
        timeout_graceful_shutdown=1,
        http=http,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("mock server failed to start")
        threading.Event().wait(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()
