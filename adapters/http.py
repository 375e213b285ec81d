"""HTTP plumbing shared by the adapters that call a provider over the network.

One pooled `UpstreamClient` per node is handed to every adapter: aiohttp's connection pool,
used directly. (httpx's API over the same pool cost about 1.2 ms of CPU per request in
`bench/`, more than the rest of the node's own logic.) This module also turns transport
failures into `UpstreamError`s and reads the two streaming framings providers use: SSE (OpenAI,
Azure, Anthropic) and NDJSON (Ollama).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Mapping
from contextvars import ContextVar
from types import TracebackType
from typing import NamedTuple, Protocol, TypeVar

import aiohttp
import msgspec
import yarl

from adapters.aiohttp_post import Answered, Pool, post
from adapters.types import (
    Upstream,
    UpstreamError,
    error_status_for,
    parse_retry_after,
    parse_retry_after_ms,
)

T = TypeVar("T")

# An error body larger than this is not worth reading in full to find a message.
MAX_ERROR_BODY = 64 * 1024

# When the attempt running in this task must be over (the event loop's clock), set by the
# router: every call to a provider, and every byte of its answer (a stream's too), is read
# within it. A ContextVar so that the deadline follows the request through the adapters
# without widening each adapter's signature; None: only the upstream's own timeouts apply.
ATTEMPT_DEADLINE: ContextVar[float | None] = ContextVar("aihub_attempt_deadline", default=None)


class _OpenAIErrorDetail(msgspec.Struct):
    message: str = ""
    type: str | None = None
    code: str | int | None = None


class _OpenAIErrorBody(msgspec.Struct):
    error: _OpenAIErrorDetail | str | None = None
    message: str | None = None


def openai_error_message(body: bytes) -> tuple[str, str | None]:
    """The (message, code) of an OpenAI-style error body, or the body's text."""
    try:
        parsed = msgspec.json.decode(body, type=_OpenAIErrorBody)
    except msgspec.DecodeError:
        return body[:500].decode(errors="replace").strip(), None
    if isinstance(parsed.error, _OpenAIErrorDetail):
        code = parsed.error.code
        return parsed.error.message, None if code is None else str(code)
    if isinstance(parsed.error, str):
        return parsed.error, None
    return parsed.message or body[:500].decode(errors="replace").strip(), None


class _Chunk(Protocol):
    error: object


C = TypeVar("C", bound=_Chunk)


def openai_chunk(decoder: msgspec.json.Decoder[C], data: bytes, upstream: Upstream) -> C:
    """A chunk of an OpenAI-compatible stream, as `decoder` reads it: one that does not read,
    or that carries an `error`, is the upstream failing mid-stream (502)."""
    try:
        chunk = decoder.decode(data)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise UpstreamError(
            502, f"{upstream.provider} upstream sent an invalid chunk: {exc}"
        ) from exc
    if chunk.error is not None:
        message, _ = openai_error_message(data)
        raise UpstreamError(502, f"{upstream.provider} upstream failed: {message}")
    return chunk


ErrorParser = Callable[[bytes], tuple[str, str | None]]
# Refines an error from what only the answer's headers say (AWS names its exception in
# `x-amzn-ErrorType`, not in the body).
ErrorRefiner = Callable[[UpstreamError, Mapping[str, str]], UpstreamError]


def upstream_error(
    upstream: Upstream,
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    parse: ErrorParser = openai_error_message,
) -> UpstreamError:
    client_status, retryable = error_status_for(status)
    message, code = parse(body)
    where = f"{upstream.provider} upstream answered {status}"
    return UpstreamError(
        client_status,
        f"{where}: {message}" if message else where,
        type="invalid_request_error" if client_status in (400, 404, 413, 422) else "upstream_error",
        code=code,
        retryable=retryable,
        retry_after=retry_after_of(headers),
        upstream_status=status,
    )


def retry_after_of(headers: Mapping[str, str]) -> float | None:
    """The wait an upstream asks for: OpenAI's finer `retry-after-ms` if it is sane, else the
    standard `Retry-After`; both untrusted, both clamped."""
    precise = parse_retry_after_ms(headers.get("retry-after-ms"))
    return precise if precise is not None else parse_retry_after(headers.get("retry-after"))


# What aiohttp raises when the network or the peer fails (its own errors, and timeouts).
TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


def transport_error(upstream: Upstream, exc: BaseException) -> UpstreamError:
    """A connection failure or timeout: always retryable, never the client's fault."""
    if isinstance(exc, asyncio.TimeoutError):  # aiohttp's timeouts are TimeoutErrors too
        deadline = ATTEMPT_DEADLINE.get()
        if deadline is not None and asyncio.get_running_loop().time() >= deadline - 0.01:
            return deadline_error(upstream)
        return UpstreamError(
            504,
            f"{upstream.provider} upstream timed out ({type(exc).__name__})",
            type="timeout",
            retryable=True,
        )
    return UpstreamError(
        502,
        f"{upstream.provider} upstream unreachable ({type(exc).__name__}: {exc})",
        type="upstream_unreachable",
        retryable=True,
    )


# How long an idle pooled connection is kept for reuse. It must stay below the idle timeout
# of the servers it reaches, a peer's `[server] keepalive_timeout` above all: a client that
# keeps a connection longer than its server does reuses it as the server closes it, and the
# request on it fails, or pays a new connection (and TLS handshake) after every pause.
POOL_IDLE_SECONDS = 30.0


class UpstreamClient:
    """The node's one pooled client for providers (and peers, as upstreams)."""

    def __init__(self, *, max_connections: int = 100, keepalive: float = POOL_IDLE_SECONDS) -> None:
        self._max_connections = max_connections
        self._keepalive = keepalive
        self._pool: Pool | None = None

    def pool(self) -> Pool:
        # Made on first use, inside the running loop that will use it.
        if self._pool is None:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, keepalive_timeout=self._keepalive
            )
            session = aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar()
            )
            self._pool = Pool(session)
        return self._pool

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.session.close()
            self._pool = None

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


class UpstreamRequest(NamedTuple):
    # A `yarl.URL` built with `encoded=True` goes out exactly as given (a signed path must).
    url: str | yarl.URL
    body: bytes
    headers: dict[str, str]
    timeout: aiohttp.ClientTimeout


# How long a complete stream's end of body is waited for when it is closed, and how much of
# it is read: as long as OpenAI's own SDK waits for it; more than any chunked encoding's end.
DRAIN_SECONDS = 0.1
DRAIN_BYTES = 64 * 1024


class UpstreamResponse:
    """A provider's answer: its status and headers; its body read (`content`), or left to be
    streamed (`aiter_bytes`) and then closed."""

    def __init__(self, response: Answered, content: bytes = b"") -> None:
        self._response = response
        self.status_code = response.status
        self.headers: Mapping[str, str] = response.headers
        self.content = content
        self._complete = False

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        # aiohttp's own iterator, not a generator around it: one frame less on every chunk.
        return self._response.content.iter_any()

    def complete(self) -> None:
        """The stream's last event is read (`[DONE]`, `message_stop`, …): what is left of the
        body is only its end, which closing reads (`aclose`)."""
        self._complete = True

    async def aclose(self) -> None:
        try:
            if self._complete:
                await _drain(self._response)
        finally:  # cancelled while draining (the client gone): the connection is still let go
            finish(self._response)


async def _drain(response: Answered) -> None:
    """Read the end of a complete stream's body (a chunked body's last chunk comes after the
    last event, often in a segment of its own), so that its connection goes back to the pool:
    aiohttp keeps only a connection whose response was read to the end, and otherwise the
    next request pays a new connection (a TLS handshake, with a real provider) before its first
    byte. Bounded in time and bytes: an upstream that keeps its body open or goes on sending
    after its last event loses the connection instead (`finish` closes it), as before."""
    content = response.content
    if content.at_eof():
        return  # the end came with the last event: no timer to arm
    read = 0
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            while not content.at_eof() and read <= DRAIN_BYTES:
                read += len(await content.readany())
    except TRANSPORT_ERRORS:  # a timeout among them: the answer is complete all the same
        pass


def finish(response: Answered) -> None:
    """Done with a response: its connection goes back to the pool if the body was read to
    the end, and is closed if it was cut short (deadline, size limit, client gone)."""
    if response.content.at_eof():
        response.release()
    else:
        response.close()


def timeout_for(upstream: Upstream) -> aiohttp.ClientTimeout:
    return _timeout(None, upstream.connect_timeout, upstream.read_timeout)


def deadline_error(upstream: Upstream) -> UpstreamError:
    return UpstreamError(
        504,
        f"{upstream.provider} upstream did not answer within the attempt's deadline",
        type="timeout",
        code="deadline_exceeded",
        retryable=True,
    )


def _within_deadline(upstream: Upstream, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientTimeout:
    """The request's timeout with the attempt's deadline as aiohttp's `total`: one timer per
    call that bounds the connection, the request and the whole answer, a stream's included."""
    deadline = ATTEMPT_DEADLINE.get()
    if deadline is None:
        return timeout
    left = deadline - asyncio.get_running_loop().time()
    if left <= 0:
        raise deadline_error(upstream)
    # Whole seconds (a little early, never late) so that the timeouts, immutable, are shared:
    # building one costs more than the rest of this call.
    total = int(left) if left >= 1 else left
    read = timeout.sock_read
    if read is not None and total + 1 <= read:
        # aiohttp's total fires by `total` (rounded up to the next second at most), and the
        # read timeout no sooner than `read` after any byte: it can never fire first, so it is
        # not armed. Armed, aiohttp cancels and makes a timer on every segment received, a
        # stream's every event (the default attempt and read timeouts are both 600 s).
        read = None
    if total < 1:
        return aiohttp.ClientTimeout(total=total, sock_connect=timeout.sock_connect, sock_read=read)
    return _timeout(total, timeout.sock_connect, read)


@functools.lru_cache(maxsize=1024)
def _timeout(
    total: float | None, connect: float | None, read: float | None
) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=total, sock_connect=connect, sock_read=read)


def too_large(upstream: Upstream, what: str, limit: int) -> UpstreamError:
    # Not retryable on the same deployment (it would send the same again); the next one may.
    return UpstreamError(
        502,
        f"{upstream.provider} upstream sent {what} larger than {limit} bytes",
        code="upstream_response_too_large",
    )


async def _read_limited(response: Answered, upstream: Upstream) -> bytes:
    """The whole body, refused past `max_response_bytes` (announced or received)."""
    limit = upstream.max_response_bytes
    if response.content_length is not None and response.content_length > limit:
        raise too_large(upstream, "an answer", limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise too_large(upstream, "an answer", limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def send(
    client: UpstreamClient,
    upstream: Upstream,
    request: UpstreamRequest,
    *,
    stream: bool = False,
    parse_error: ErrorParser = openai_error_message,
    refine_error: ErrorRefiner | None = None,
) -> UpstreamResponse:
    """Send a request; answer the response if its status is 2xx, else raise `UpstreamError`.

    With `stream=True` the body is left unread for the caller, who must close the response.
    """
    timeout = _within_deadline(upstream, request.timeout)
    try:
        response = await post(
            client.pool(), _as_url(request.url), request.body, request.headers, timeout
        )
    except TRANSPORT_ERRORS as exc:
        raise transport_error(upstream, exc) from exc
    if response.status < 300:
        if stream:
            return UpstreamResponse(response)
        try:
            body = await _read_limited(response, upstream)
        except TRANSPORT_ERRORS as exc:
            response.close()
            raise transport_error(upstream, exc) from exc
        except BaseException:
            response.close()  # too large, or cancelled: the rest of the body is not wanted
            raise
        response.release()
        return UpstreamResponse(response, body)
    try:
        body = await response.content.read(MAX_ERROR_BODY)
    except TRANSPORT_ERRORS:
        body = b""
    finally:
        finish(response)
    error = upstream_error(upstream, response.status, body, response.headers, parse_error)
    raise error if refine_error is None else refine_error(error, response.headers)


@functools.lru_cache(maxsize=1024)
def _parsed(url: str) -> yarl.URL:
    try:
        return yarl.URL(url)
    except ValueError as exc:  # a peer's URL is untrusted: a transport error, as aiohttp's
        raise aiohttp.InvalidUrlClientError(url) from exc


def _as_url(url: str | yarl.URL) -> yarl.URL:
    # A deployment's few URLs, parsed once (a yarl.URL is immutable); a signed one as given.
    return url if isinstance(url, yarl.URL) else _parsed(url)


def build_request(
    upstream: Upstream,
    url: str,
    body: bytes,
    headers: dict[str, str],
) -> UpstreamRequest:
    return UpstreamRequest(
        url,
        body,
        {"content-type": "application/json", **upstream.headers, **headers},
        timeout_for(upstream),
    )


class SSEEvent(NamedTuple):
    event: bytes
    data: bytes


async def iter_sse(response: UpstreamResponse, upstream: Upstream) -> AsyncIterator[SSEEvent]:
    """Parse a `text/event-stream` body into events, per the WHATWG framing rules.

    Hand-written rather than taken from httpx-sse because that library decodes every line to
    `str`; on the gateway's hottest loop staying in bytes is measurably cheaper.
    """
    limit = upstream.max_event_bytes
    buffer = b""
    event = b""
    data: list[bytes] = []
    size = 0  # of the event being read: its data lines so far
    try:
        async for chunk in response.aiter_bytes():
            buffer += chunk
            while True:
                cut = _line_end(buffer)
                if cut is None:
                    break
                end, after = cut
                line = buffer[:end]
                buffer = buffer[after:]
                if not line:
                    if data:
                        yield SSEEvent(event or b"message", b"\n".join(data))
                    event, data, size = b"", [], 0
                    continue
                if line.startswith(b":"):
                    continue
                field, _, value = line.partition(b":")
                if value.startswith(b" "):
                    value = value[1:]
                if field == b"data":
                    size += len(value) + 1
                    if size > limit:
                        raise too_large(upstream, "a stream event", limit)
                    data.append(value)
                elif field == b"event":
                    event = value
            if len(buffer) > limit:  # one line, still unfinished, is already too long
                raise too_large(upstream, "a stream event", limit)
    except TRANSPORT_ERRORS as exc:
        raise transport_error(upstream, exc) from exc
    if data:
        yield SSEEvent(event or b"message", b"\n".join(data))


def _line_end(buffer: bytes) -> tuple[int, int] | None:
    """Where the first line of `buffer` ends and the next begins (CRLF, LF or CR)."""
    lf = buffer.find(b"\n")
    cr = buffer.find(b"\r")
    if cr == -1 or (lf != -1 and lf < cr):
        return None if lf == -1 else (lf, lf + 1)
    if cr == len(buffer) - 1:
        return None  # a CR at the very end may be the first half of a CRLF
    return (cr, cr + 2) if buffer[cr + 1 : cr + 2] == b"\n" else (cr, cr + 1)


async def iter_ndjson(response: UpstreamResponse, upstream: Upstream) -> AsyncIterator[bytes]:
    """The non-empty lines of a newline-delimited JSON body."""
    limit = upstream.max_event_bytes
    buffer = b""
    try:
        async for chunk in response.aiter_bytes():
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if len(line) > limit:
                    raise too_large(upstream, "a stream line", limit)
                if line.strip():
                    yield line
            if len(buffer) > limit:
                raise too_large(upstream, "a stream line", limit)
    except TRANSPORT_ERRORS as exc:
        raise transport_error(upstream, exc) from exc
    if buffer.strip():
        yield buffer


def join_url(base: str, path: str) -> str:
    return base.rstrip("/") + "/" + path.lstrip("/")


def decode_json(decoder: msgspec.json.Decoder[T], data: bytes, upstream: Upstream) -> T:
    """An upstream's JSON answer, or a retryable 502 if it is not what its API promises."""
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise UpstreamError(
            502, f"{upstream.provider} upstream sent invalid JSON: {exc}", retryable=True
        ) from exc
