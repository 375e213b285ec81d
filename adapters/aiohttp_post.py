"""One POST on aiohttp's connection pool, a level below `ClientSession.request` and below
`ClientRequest.send`.

`ClientSession._request` does per call what the node's calls never need: its redirect loop
(which would also carry a provider key in `x-api-key` or `api-key`, and the body, to another
host on a 307; aiohttp strips only `Authorization`), the cookie jar, trace hooks, proxy and
netrc look-ups, the retry of idempotent methods, the merging of default headers and options.
Below it, `ClientRequest.send` and `ClientResponse` cost as much again for a body that is
already bytes: a `StreamWriter`, the body written by a task of its own (on Python before 3.12
scheduled for the loop's next turn, so the provider gets the request a turn late), upload
tracking, a response object with its own life cycle. Measured in-process
(`bench/client_cost.py`), aiohttp's part of a call went from ~51 to ~25 µs.

So aiohttp still builds the request (`ClientRequest`: the URL, the headers it adds — Host,
Accept, Accept-Encoding, User-Agent — the Content-Length, the checks), finds or opens the
connection (its connector: the pool, limits, TLS, `sock_connect`), serialises the head (its
`_serialize_headers`, which refuses CR or LF in a name or value) and parses the answer (its
protocol: llhttp, decompression, `sock_read`, the payload's stream); this module only puts
the head and the body on the connection in one write and hands back what the protocol read,
as `ProviderAnswer`, with the same timers (`total` over the whole answer) and the same
clean-up as `ClientResponse`: the connection back to the pool once the body is read to its
end, closed if it was cut short. It leans on aiohttp below its documented API (the
protocol's `set_response_params` and `read`, `TimeoutHandle`, `_serialize_headers`, the
session's reading limits): the lock pins aiohttp, and the adapter tests cover every step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp
import yarl
from aiohttp.client_proto import ResponseHandler
from aiohttp.connector import Connection
from aiohttp.helpers import TimeoutHandle
from aiohttp.http_writer import _serialize_headers
from aiohttp.streams import StreamReader
from multidict import CIMultiDictProxy

_SCHEMES = frozenset({"http", "https"})
# What reading a released answer's body raises, as aiohttp's own `ClientResponse` has it.
_RELEASED = aiohttp.ClientConnectionError("Connection closed")


class ProviderAnswer:
    """A provider's answer as its connection's protocol read it: the status and headers, the
    body left in `content` (aiohttp's `StreamReader`) to be read, then `release`d (back to
    the pool, if the body was read to its end) or `close`d. The names are those of
    aiohttp's `ClientResponse`, which the rare call that needs aiohttp's whole path answers."""

    __slots__ = ("connection", "content", "content_length", "headers", "reason", "status")

    def __init__(
        self,
        connection: Connection,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
        content: StreamReader,
    ) -> None:
        self.connection: Connection | None = connection
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content = content
        self.content_length = _length(headers.get("Content-Length"))
        # As `ClientResponse`: the connection is let go as soon as the body is read whole.
        content.on_eof(self.release)

    def release(self) -> None:
        """Done with the answer: its connection back to the pool if nothing of the body is
        left unread (the protocol decides), else closed."""
        self._let_go()
        if self.connection is not None:
            connection, self.connection = self.connection, None
            connection.release()

    def close(self) -> None:
        """Done with the answer, whatever of its body is left: its connection closed."""
        self._let_go()
        if self.connection is not None:
            connection, self.connection = self.connection, None
            connection.close()

    def _let_go(self) -> None:
        # A read of the body after this fails, rather than waiting on a connection let go.
        if self.content.exception() is None and not self.content.is_eof():
            self.content.set_exception(_RELEASED)


# What `post` answers: the lean answer, or aiohttp's own for the call that takes its whole path.
Answered = ProviderAnswer | aiohttp.ClientResponse


def _length(value: str | None) -> int | None:
    # llhttp has refused a Content-Length that is not digits; a body without one has none.
    return int(value) if value is not None and value.isdigit() else None


async def post(
    session: aiohttp.ClientSession,
    url: yarl.URL,
    body: bytes,
    headers: Mapping[str, str],
    timeouts: aiohttp.ClientTimeout,
) -> Answered:
    """The provider's answer, its head read and its body left to be read (or released);
    never a redirect followed: a 3xx is answered as it came."""
    if url.scheme not in _SCHEMES:
        raise aiohttp.NonHttpUrlClientError(url)
    if not url.raw_host:
        raise aiohttp.InvalidUrlClientError(url)
    if url.raw_user is not None:
        # Credentials in the URL: aiohttp's own path turns them into a BasicAuth header.
        return await session.post(
            url, data=body, headers=headers, timeout=timeouts, allow_redirects=False
        )
    connector = session.connector
    assert connector is not None
    loop = asyncio.get_running_loop()
    # As `_request`: one timer for `total`, cancelling whatever task reads within it.
    total = TimeoutHandle(loop, timeouts.total, ceil_threshold=timeouts.ceil_threshold)
    handle = total.start()
    timer = total.timer()
    try:
        with timer:
            request = aiohttp.ClientRequest(
                "POST", url, headers=headers, data=body, loop=loop, session=session
            )
            try:
                connection = await connector.connect(request, traces=[], timeout=timeouts)
            except TimeoutError as exc:
                raise aiohttp.ConnectionTimeoutError(
                    f"Connection timeout to host {request.url}"
                ) from exc
            try:
                answer = await _exchange(
                    session, connector, connection, request, body, timer, timeouts
                )
            except BaseException:
                connection.close()
                raise
    except BaseException as exc:
        total.close()
        if handle is not None:
            handle.cancel()
        if isinstance(exc, OSError) and not isinstance(exc, (aiohttp.ClientError, TimeoutError)):
            raise aiohttp.ClientOSError(*exc.args) from exc  # as `_request` has it
        raise
    if handle is not None:
        # The total timer lasts as long as the answer is read, and no longer.
        if answer.connection is not None:
            answer.connection.add_callback(handle.cancel)
        else:
            handle.cancel()
    return answer


async def _exchange(
    session: aiohttp.ClientSession,
    connector: aiohttp.BaseConnector,
    connection: Connection,
    request: aiohttp.ClientRequest,
    body: bytes,
    timer: aiohttp.helpers.BaseTimerContext,
    timeouts: aiohttp.ClientTimeout,
) -> ProviderAnswer:
    """The request on `connection` (head and body in one write), and the answer's head."""
    protocol = connection.protocol
    assert protocol is not None
    protocol.set_response_params(
        timer=timer,
        read_until_eof=True,
        auto_decompress=session.auto_decompress,
        read_timeout=timeouts.sock_read,
        read_bufsize=session._read_bufsize,
        timeout_ceil_threshold=connector._timeout_ceil_threshold,
        max_line_size=session._max_line_size,
        max_field_size=session._max_field_size,
        max_headers=session._max_headers,
    )
    headers = request.headers
    # What `ClientRequest.send` adds to the head before writing it.
    if "Content-Type" not in headers:
        headers["Content-Type"] = "application/octet-stream"
    if connector.force_close and "Connection" not in headers:
        headers["Connection"] = "close"
    head = _serialize_headers(f"POST {request.url.raw_path_qs} HTTP/1.1", headers)
    transport = protocol.transport
    if transport is None or transport.is_closing():
        raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")
    transport.write(head + body)
    protocol.start_timeout()  # `sock_read`, from the request's end, as aiohttp arms it
    return await _answer(connection, protocol, request)


async def _answer(
    connection: Connection, protocol: ResponseHandler, request: aiohttp.ClientRequest
) -> ProviderAnswer:
    while True:
        try:
            message, payload = await protocol.read()
        except aiohttp.http.HttpProcessingError as exc:
            raise aiohttp.ClientResponseError(
                request.request_info, (), status=exc.code, message=exc.message, headers=exc.headers
            ) from exc
        # An interim answer (100 Continue, 103 Early Hints) is followed by the real one.
        if not 100 <= message.code <= 199 or message.code == 101:
            break
    return ProviderAnswer(connection, message.code, message.reason, message.headers, payload)
