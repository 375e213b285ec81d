"""One socket write per turn of the event loop for each client connection.

uvicorn writes a response's head when the app sends `http.response.start` and its body when
the app sends the body: two `send` system calls and two TCP segments for every complete
answer, so the client is woken twice too; a translated stream (the Responses and Messages
surfaces turn one upstream chunk into several events) is a write per event. On a machine
whose cores the node shares with its clients and upstreams each of those costs a system call
on both sides. `CoalescingTransport` holds what is written during one turn of the loop and
hands it to the real transport once, at the end of that turn (`call_soon`): a complete answer
leaves as one write, a stream's events of one upstream chunk too, and nothing waits longer
than the loop's current turn (no timer, no size threshold).

A response's last bytes do not wait for the turn's end: the protocol `flush`es when the
server reports the response complete (`connections.py`). What the request's task does after
its last `send` in the same turn (the access line, metrics, releasing what it held: ~60 µs a
request measured through a real node) would otherwise run before the client is answered.

Closing flushes first (what was written is sent before the close); aborting drops it, as an
abort drops the real transport's buffer.
"""

from __future__ import annotations

import asyncio
from typing import Any


class CoalescingTransport:
    """Wraps a connection's transport for the protocol and its request cycles: `write`
    coalesces within a turn of the loop, everything else is the real transport's."""

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if self._pending is None:
            self._pending = [bytes(data)]
            self._loop.call_soon(self.flush)
        else:
            self._pending.append(bytes(data))

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        """Hand what is held to the real transport now (the turn's end finds nothing)."""
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._pending = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        # is_closing, get_extra_info, pause_reading, resume_reading, ...: the real ones.
        return getattr(self._transport, name)
