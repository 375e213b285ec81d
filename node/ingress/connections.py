"""The HTTP/1.1 protocol `aihub serve` runs under uvicorn: uvicorn's httptools protocol with
the deadlines and the connection limit it lacks.

uvicorn closes a connection that idles after a response (its keep-alive timeout) but has no
deadline for a request's head or body, and its `limit_concurrency` only answers 503 once a
request's head has arrived. So a client that opens connections and sends nothing, or drips a
byte of its head now and then, holds a socket (a file descriptor) forever; 20,000 of them
exhaust the file limit and the node stops answering. Here:

- a request head must be complete `header_timeout` seconds after its first byte (or after the
  connection opens); a body `body_timeout` seconds after its head: else 408 and close;
- past `max_connections` open connections, a new one is answered 503 and closed at once, so the
  node never holds more sockets than that (per worker process);
- what is written during one turn of the event loop leaves in one write (`coalesce.py`): a
  response's head and body are one system call, not two, sent as soon as the response is
  complete rather than after what its task does next in that turn;
- a request whose connection is lost before its answer is complete is told so at once
  (`client_gone.py`), without a task of its own waiting on `receive()` for it.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import msgspec
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from federation.httpsig import REQUEST_ID_HEADER
from federation.ids import new_request_id
from node.config import ServerSection
from node.ingress.client_gone import CLIENT_GONE, ClientGone
from node.ingress.coalesce import CoalescingTransport
from node.ingress.errors import ErrorDetail, error_bytes

log = logging.getLogger("aihub.connections")

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 503: b"Service Unavailable"}


class ConnectionLimits(msgspec.Struct, frozen=True):
    header_timeout: float
    body_timeout: float
    max_connections: int


def refusal(status: int, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 answer, OpenAI-shaped and with a request id, that closes the
    connection: for what is refused before (or instead of) the app."""
    type_ = "server_error" if status >= 500 else "invalid_request_error"
    body = error_bytes(ErrorDetail(message, type_, code))
    head = [
        b"HTTP/1.1 %d %s" % (status, _REASONS[status]),
        b"content-type: application/json",
        b"content-length: %d" % len(body),
        b"connection: close",
        REQUEST_ID_HEADER.encode() + b": " + new_request_id().encode(),
    ]
    if status == 503:
        head.append(b"retry-after: 1")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


_TOO_MANY = refusal(503, "Too many open connections", "too_many_connections")


Phase = Literal["idle", "head", "body"]


class GuardedHttpProtocol(HttpToolsProtocol):
    """One client connection: uvicorn's protocol plus a deadline while a request's head or
    body is incomplete, and a refusal past the connection limit.

    The deadline is set after each read, only if that read left a head or a body
    incomplete: a request that arrives whole (the usual case) arms no timer."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.refused = False
        # What the connection is waiting for from the client: nothing ("idle": a response
        # is being written, or uvicorn's keep-alive timer runs), the rest of a head or a body.
        self.phase: Phase = "idle"
        self.deadline: asyncio.TimerHandle | None = None
        self.deadline_for: Phase = "idle"

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            # Refused before it is counted or read: its socket is closed right away.
            self.refused = True
            self.transport = transport
            transport.write(_TOO_MANY)
            transport.close()
            return
        super().connection_made(transport)
        # The request cycles write through this: a response's head and body in one write.
        self.transport = CoalescingTransport(transport, self.loop)  # type: ignore[assignment]
        # A connection that never sends a byte is a head that never arrives.
        self.phase = "head"
        self._arm("head")

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        super().data_received(data)
        phase = self.phase
        if phase == "idle" or self.transport.is_closing():
            if self.deadline is not None:
                self._disarm()
        elif self.deadline_for != phase:
            self._arm(phase)

    def on_message_begin(self) -> None:
        self.phase = "head"
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self.phase = "body"
        # Fired by connection_lost: the request's watchers need no task of their own.
        gone = ClientGone(self.flow.resume_reading)
        self.scope[CLIENT_GONE] = gone  # type: ignore[literal-required]
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.phase = "idle"
        super().on_message_complete()

    def on_response_complete(self) -> None:
        # Called by the cycle's `send` right after the last body write: the answer leaves
        # now, before the request's task goes on to its bookkeeping in this turn.
        self.transport.flush()  # type: ignore[attr-defined]
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        cycle = self.cycle
        super().connection_lost(exc)
        if cycle is not None and not cycle.response_complete:
            gone = cycle.scope.get(CLIENT_GONE)  # type: ignore[call-overload]
            if gone is not None:
                gone.fire()

    def send_400_response(self, msg: str) -> None:
        # uvicorn's own answer to bytes that are not HTTP is plain text without a request id.
        self.transport.write(refusal(400, msg, "invalid_http"))
        self.transport.close()

    def _arm(self, phase: Phase) -> None:
        self._disarm()
        seconds = self.limits.header_timeout if phase == "head" else self.limits.body_timeout
        self.deadline = self.loop.call_later(seconds, self._expired)
        self.deadline_for = phase

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        self.deadline_for = "idle"

    def _expired(self) -> None:
        phase = self.deadline_for
        self.deadline, self.deadline_for = None, "idle"
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if phase == "body" and cycle is not None:
            # The app sees a disconnect (connection_lost wakes it), and whatever it still
            # sends is dropped: the answer is this 408.
            answer = not cycle.response_started
            cycle.disconnected = True
        else:
            # A head: answered unless a response (to an earlier request) is being written.
            answer = cycle is None or cycle.response_complete
        what = "head" if phase == "head" else "body"
        message = f"The request {what} took too long to arrive"
        log.debug("closing a connection from %s: %s", _peer(self.client), message.lower())
        if answer:
            self.transport.write(refusal(408, message, "request_timeout"))
        self.transport.close()


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "a client"


def connection_limit(configured: int) -> int:
    """The configured limit, or less if the process's file limit could not hold it beside the
    node's own sockets (upstreams, peers, the store): at most half of the soft file limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or configured <= soft // 2:
        return configured
    limit = max(1, soft // 2)
    log.warning(
        "server.max_connections = %d is more than this process's file limit allows; "
        "using %d (raise the limit with `ulimit -n` or LimitNOFILE=)",
        configured,
        limit,
    )
    return limit


def guarded_protocol(server: ServerSection) -> Callable[..., GuardedHttpProtocol]:
    """What uvicorn builds each connection's protocol with (a partial pickles, so it also
    reaches every worker process)."""
    limits = ConnectionLimits(
        header_timeout=server.header_timeout,
        body_timeout=server.body_timeout,
        max_connections=server.max_connections,
    )
    return partial(GuardedHttpProtocol, limits=limits)
