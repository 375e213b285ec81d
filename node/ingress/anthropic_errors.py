"""Anthropic-shaped errors: `{"type": "error", "error": {"type", "message"}}` on every failure
of the Messages endpoints.

The node's domain errors (`node.errors.HubError`) map here onto Anthropic's error types and
statuses, as `node/ingress/errors.py` maps them onto OpenAI's; what the HTTP layer raises on
its own (a body past the limit, a wrong method) and the OpenAI-shaped `ApiError` the shared
decoding raises are rendered in the same shape. `EXCEPTION_HANDLERS` are the Messages routes'
own, so that these paths never answer in OpenAI's shape.
"""

from __future__ import annotations

import logging

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException

from node.errors import HubError, Kind, UpstreamFailed
from node.ingress.errors import ApiError, store_unavailable
from node.storage.records import StoreUnavailable

log = logging.getLogger("aihub.errors")


class AnthropicErrorDetail(msgspec.Struct):
    type: str
    message: str


class AnthropicError(msgspec.Struct, tag_field="type", tag="error"):
    error: AnthropicErrorDetail


# Each kind's status and Anthropic type.
_KINDS: dict[Kind, tuple[int, str]] = {
    Kind.INVALID_REQUEST: (400, "invalid_request_error"),
    Kind.UNAUTHENTICATED: (401, "authentication_error"),
    Kind.FORBIDDEN: (403, "permission_error"),
    Kind.REFUSED: (403, "permission_error"),
    Kind.NOT_FOUND: (404, "not_found_error"),
    Kind.CONFLICT: (409, "invalid_request_error"),
    Kind.GONE: (410, "invalid_request_error"),
    Kind.TOO_LARGE: (413, "request_too_large"),
    Kind.RATE_LIMITED: (429, "rate_limit_error"),
    Kind.OVER_BUDGET: (429, "rate_limit_error"),
    Kind.CLIENT_CLOSED: (499, "invalid_request_error"),
    Kind.INTERNAL: (500, "api_error"),
    Kind.GATEWAY_FAILURE: (502, "api_error"),
    Kind.PEER_FAILURE: (502, "api_error"),
    Kind.UNAVAILABLE: (503, "overloaded_error"),
    Kind.PEER_TIMEOUT: (504, "api_error"),
}
# The type Anthropic names a status by (for an upstream's status, and Litestar's errors).
_STATUSES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def status_type(status: int) -> str:
    if status in _STATUSES:
        return _STATUSES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


class Shaped(msgspec.Struct):
    """An error as the Messages API answers it: its status, body and headers."""

    status: int
    detail: AnthropicErrorDetail
    headers: dict[str, str] = {}


def anthropic_error(exc: HubError) -> Shaped:
    """A domain error as Anthropic's API would answer it."""
    if isinstance(exc, UpstreamFailed):
        upstream = exc.upstream
        headers = {}
        if upstream.retry_after is not None:
            headers["retry-after"] = str(max(1, round(upstream.retry_after)))
        detail = AnthropicErrorDetail(status_type(upstream.status), upstream.message)
        return Shaped(upstream.status, detail, headers)
    status, type_ = _KINDS[exc.kind]
    headers = dict(exc.limits)
    if exc.retry_after is not None:
        headers["retry-after"] = str(exc.retry_after)
    return Shaped(status, AnthropicErrorDetail(type_, exc.message), headers)


def error_bytes(detail: AnthropicErrorDetail) -> bytes:
    return msgspec.json.encode(AnthropicError(detail))


def _response(shaped: Shaped) -> Response[bytes]:
    return Response(
        error_bytes(shaped.detail),
        status_code=shaped.status,
        media_type="application/json",
        headers=shaped.headers,
    )


def _api_error(_: Request, exc: ApiError) -> Response[bytes]:
    # Anthropic's errors have no `param`: its messages name the field first, as here.
    message = exc.detail.message
    if exc.detail.param:
        message = f"{exc.detail.param}: {message}"
    detail = AnthropicErrorDetail(status_type(exc.status), message)
    return _response(Shaped(exc.status, detail, exc.headers))


def _hub_error(_: Request, exc: HubError) -> Response[bytes]:
    return _response(anthropic_error(exc))


def _http_exception(_: Request, exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    message = exc.detail if isinstance(exc.detail, str) and exc.detail else "request failed"
    if status == 413:
        message = "Request body too large"
    headers = dict(exc.headers or {})
    return _response(Shaped(status, AnthropicErrorDetail(status_type(status), message), headers))


def _unexpected(request: Request, exc: Exception) -> Response[bytes]:
    # A bug of ours: log it with its traceback, answer without one.
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _response(Shaped(500, AnthropicErrorDetail("api_error", "Internal error")))


def _store_unavailable(request: Request, exc: StoreUnavailable) -> Response[bytes]:
    return _hub_error(request, store_unavailable(exc))


EXCEPTION_HANDLERS = {
    ApiError: _api_error,
    HubError: _hub_error,
    StoreUnavailable: _store_unavailable,
    HTTPException: _http_exception,
    Exception: _unexpected,
}
