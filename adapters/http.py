"""HTTP plumbing shared by the adapters that call a provider over the network.

One pooled `httpx.AsyncClient` per node is handed to every adapter; this module turns its
failures into `UpstreamError`s and reads the two streaming framings providers use: SSE
(OpenAI, Azure, Anthropic) and NDJSON (Ollama).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import NamedTuple, TypeVar

import httpx
import msgspec

from adapters.types import Upstream, UpstreamError, error_status_for, parse_retry_after

T = TypeVar("T")

# An error body larger than this is not worth reading in full to find a message.
MAX_ERROR_BODY = 64 * 1024


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


ErrorParser = Callable[[bytes], tuple[str, str | None]]


def upstream_error(
    upstream: Upstream,
    status: int,
    body: bytes,
    headers: httpx.Headers,
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
        retry_after=parse_retry_after(headers.get("retry-after")),
        upstream_status=status,
    )


def transport_error(upstream: Upstream, exc: Exception) -> UpstreamError:
    """A connection failure or timeout: always retryable, never the client's fault."""
    if isinstance(exc, httpx.TimeoutException):
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


def timeout_for(upstream: Upstream) -> httpx.Timeout:
    return httpx.Timeout(upstream.read_timeout, connect=upstream.connect_timeout)


async def send(
    client: httpx.AsyncClient,
    upstream: Upstream,
    request: httpx.Request,
    *,
    stream: bool = False,
    parse_error: ErrorParser = openai_error_message,
) -> httpx.Response:
    """Send a request; answer the response if its status is 2xx, else raise `UpstreamError`.

    With `stream=True` the body is left unread for the caller, who must close the response.
    """
    try:
        response = await client.send(request, stream=stream)
    except httpx.HTTPError as exc:
        raise transport_error(upstream, exc) from exc
    if response.status_code < 300:
        return response
    try:
        body = await _read_capped(response)
    except httpx.HTTPError:
        body = b""
    finally:
        await response.aclose()
    raise upstream_error(upstream, response.status_code, body, response.headers, parse_error)


async def _read_capped(response: httpx.Response) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        parts.append(chunk)
        size += len(chunk)
        if size >= MAX_ERROR_BODY:
            break
    return b"".join(parts)


def build_request(
    client: httpx.AsyncClient,
    upstream: Upstream,
    url: str,
    body: bytes,
    headers: dict[str, str],
) -> httpx.Request:
    return client.build_request(
        "POST",
        url,
        content=body,
        headers={"content-type": "application/json", **upstream.headers, **headers},
        timeout=timeout_for(upstream),
    )


class SSEEvent(NamedTuple):
    event: bytes
    data: bytes


async def iter_sse(response: httpx.Response, upstream: Upstream) -> AsyncIterator[SSEEvent]:
    """Parse a `text/event-stream` body into events, per the WHATWG framing rules.

    Hand-written rather than taken from httpx-sse because that library decodes every line to
    `str`; on the gateway's hottest loop staying in bytes is measurably cheaper.
    """
    buffer = b""
    event = b""
    data: list[bytes] = []
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
                    event, data = b"", []
                    continue
                if line.startswith(b":"):
                    continue
                field, _, value = line.partition(b":")
                if value.startswith(b" "):
                    value = value[1:]
                if field == b"data":
                    data.append(value)
                elif field == b"event":
                    event = value
    except httpx.HTTPError as exc:
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


async def iter_ndjson(response: httpx.Response, upstream: Upstream) -> AsyncIterator[bytes]:
    """The non-empty lines of a newline-delimited JSON body."""
    buffer = b""
    try:
        async for chunk in response.aiter_bytes():
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line.strip():
                    yield line
    except httpx.HTTPError as exc:
        raise transport_error(upstream, exc) from exc
    if buffer.strip():
        yield buffer


def join_url(base: str, path: str) -> str:
    return base.rstrip("/") + "/" + path.lstrip("/")


def decode_json(decoder: msgspec.json.Decoder[T], data: bytes, upstream: Upstream) -> T:
    """An upstream's JSON answer, or a retryable 502 if it is not what its API promises."""
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise UpstreamError(
            502, f"{upstream.provider} upstream sent invalid JSON: {exc}", retryable=True
        ) from exc
