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

So aiohttp still finds or opens the connection (its connector: the pool, limits, TLS,
`sock_connect`), serialises the head (its `_serialize_headers`, which refuses CR or LF in a
name or value) and parses the answer (its protocol: llhttp, decompression, `sock_read`, the
payload's stream). What a `ClientRequest` works out per call is the same for every request to
an origin (the connection it asks the connector for; the headers aiohttp adds: Host, Accept,
Accept-Encoding, User-Agent), so it is built once per origin (`Pool`) and each call adds only
its own headers, the body's Content-Length (always its true length) and aiohttp's default
Content-Type. This module puts the head and the body on the connection in one write and
hands back what the protocol read, as `ProviderAnswer`, with the same timers (`total` over
the whole answer) and the same clean-up as `ClientResponse`: the connection back to the pool
once the body is read to its end, closed if it was cut short. It leans on aiohttp below its
documented API (the protocol's `set_response_params` and `read`, `TimeoutHandle`,
`_serialize_headers`, the session's reading limits): the lock pins aiohttp, and
tests/test_aiohttp_post.py and the adapter tests cover every step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import NamedTuple

import aiohttp
import yarl
from aiohttp.connector import Connection
from aiohttp.helpers import TimeoutHandle
from aiohttp.http_writer import _serialize_headers
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

_SCHEMES = frozenset({"http", "https"})
# Origins a pool keeps what it worked out for: the providers' and peers' few, and a bound
# against a caller that posts to ever new ones (a peer's advertised URL is untrusted).
ORIGINS_KEPT = 256


class _Origin(NamedTuple):
    # What the connector is asked for a connection by: only read by it (no proxy is used).
    request: aiohttp.ClientRequest
    added: tuple[tuple[str, str], ...]  # Host, Accept, Accept-Encoding, User-Agent, as aiohttp adds


class Pool:
    """An aiohttp session and what its posts work out once per origin (see the module)."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self._origins: dict[yarl.URL, _Origin] = {}

    def origin(self, url: yarl.URL) -> _Origin:
        key = url.origin()
        found = self._origins.get(key)
        if found is None:
            if len(self._origins) >= ORIGINS_KEPT:
                self._origins.clear()
            request = aiohttp.ClientRequest(
                "POST", key, loop=asyncio.get_running_loop(), session=self.session
            )
            fields = request.headers
            added = tuple(
                (name, fields[name])
                for name in fields
                if name not in ("Content-Length", "Content-Type")
            )
            found = _Origin(request, added)
            self._origins[key] = found
        return found


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
    pool: Pool,
    url: yarl.URL,
    body: bytes,
    headers: Mapping[str, str],
    timeouts: aiohttp.ClientTimeout,
) -> Answered:
    """The provider's answer, its head read and its body left to be read (or released);
    never a redirect followed: a 3xx is answered as it came."""
    session = pool.session
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
    origin = pool.origin(url)
    fields = _fields(origin, headers, len(body), connector.force_close)
    try:  # before anything is sent: a CR or LF would split the request
        head = _serialize_headers(f"POST {url.raw_path_qs} HTTP/1.1", fields)
    except ValueError as exc:
        # Only the node's own settings reach these headers (the server refuses a control
        # character in a client's): an API key read with its line break, say. A transport
        # error, so the caller answers 502 naming it and tries the next deployment.
        raise aiohttp.ClientError(f"not sent, a header holds a control character: {exc}") from exc
    loop = asyncio.get_running_loop()
    # As `_request`: one timer for `total`, cancelling whatever task reads within it.
    total = TimeoutHandle(loop, timeouts.total, ceil_threshold=timeouts.ceil_threshold)
    handle = total.start()
    timer = total.timer()
    try:
        with timer:
            try:
                connection = await connector.connect(origin.request, traces=[], timeout=timeouts)
            except TimeoutError as exc:
                raise aiohttp.ConnectionTimeoutError(f"Connection timeout to host {url}") from exc
            try:
                _send(session, connector, connection, head + body, timer, timeouts)
                answer = await _answer(connection, url, fields)
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


def _fields(
    origin: _Origin, headers: Mapping[str, str], length: int, force_close: bool
) -> CIMultiDict[str]:
    """The request's headers as `ClientRequest` would send them: the caller's, then what
    aiohttp adds unless the caller gave it; the body's true length."""
    fields: CIMultiDict[str] = CIMultiDict(headers)
    for name, value in origin.added:
        if name not in fields:
            fields[name] = value
    fields["Content-Length"] = str(length)
    if "Content-Type" not in fields:
        fields["Content-Type"] = "application/octet-stream"
    if force_close and "Connection" not in fields:
        fields["Connection"] = "close"
    return fields


def _send(
    session: aiohttp.ClientSession,
    connector: aiohttp.BaseConnector,
    connection: Connection,
    data: bytes,
    timer: aiohttp.helpers.BaseTimerContext,
    timeouts: aiohttp.ClientTimeout,
) -> None:
    """The whole request on `connection` in one write, its protocol set to read the answer."""
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
    transport = protocol.transport
    if transport is None or transport.is_closing():
        raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")
    transport.write(data)
    protocol.start_timeout()  # `sock_read`, from the request's end, as aiohttp arms it


async def _answer(
    connection: Connection, url: yarl.URL, fields: CIMultiDict[str]
) -> ProviderAnswer:
    protocol = connection.protocol
    assert protocol is not None
    while True:
        try:
            message, payload = await protocol.read()
        except aiohttp.http.HttpProcessingError as exc:
            info = aiohttp.RequestInfo(url, "POST", CIMultiDictProxy(fields), url)
            raise aiohttp.ClientResponseError(
                info, (), status=exc.code, message=exc.message, headers=exc.headers
            ) from exc
        # An interim answer (100 Continue, 103 Early Hints) is followed by the real one.
        if not 100 <= message.code <= 199 or message.code == 101:
            break
    return ProviderAnswer(connection, message.code, message.reason, message.headers, payload)
