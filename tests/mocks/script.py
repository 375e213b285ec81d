"""A mock upstream's scripted behaviour and its record of what it was sent."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Failure:
    """Answer the next request with this status and raw body instead of a real answer."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class MockScript:
    """Shared between a test and the mock's server thread."""

    failures: deque[Failure] = field(default_factory=deque)
    received: list[Received] = field(default_factory=list)
    # Seconds to wait before answering (and between stream chunks), for timeout and
    # cancellation tests.
    delay: float = 0.0
    chunk_delay: float = 0.0
    # Cut a stream after this many content chunks, without a closing event.
    cut_stream_after: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Requests whose client (the gateway) went away before the answer was complete.
    cancelled: int = 0

    def fail_next(self, failure: Failure, times: int = 1) -> None:
        with self.lock:
            self.failures.extend([failure] * times)

    def note_cancelled(self) -> None:
        with self.lock:
            self.cancelled += 1

    def next_failure(self) -> Failure | None:
        with self.lock:
            return self.failures.popleft() if self.failures else None

    def record(self, path: str, headers: dict[str, str], body: bytes) -> None:
        with self.lock:
            self.received.append(Received(path, headers, body))


async def wait_or_disconnect(receive: Any, seconds: float) -> bool:
    """Sleep `seconds`, unless the client disconnects first (then answer True)."""
    if seconds <= 0:
        return False
    try:
        message = await asyncio.wait_for(receive(), seconds)
    except TimeoutError:
        return False
    return message.get("type") == "http.disconnect"


async def read_body(receive: Any) -> bytes:
    """The whole body of an ASGI request."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def send_stream(script: MockScript, receive: Any, send: Any, pieces: list[bytes]) -> None:
    """Send `pieces` as one streamed body, `script.chunk_delay` apart. If the client goes away
    meanwhile, note it and stop without finishing the body."""
    for index, piece in enumerate(pieces):
        if index and await wait_or_disconnect(receive, script.chunk_delay):
            script.note_cancelled()
            return
        await send({"type": "http.response.body", "body": piece, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
