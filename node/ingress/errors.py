"""OpenAI-shaped errors: `{"error": {"message", "type", "code", "param"}}` on every failure.

The node's domain errors (`node.errors.HubError`) become OpenAI errors here (`openai_error`):
the status and type for each kind, the `retry-after` and rate-limit headers from its facts.
`ApiError` is the shape itself, for what the HTTP layer refuses on its own (a bad query
parameter, a body that is no JSON). A path under `/v1/` that no route serves is answered as an
`unsupported_endpoint` naming it (OpenAI's API has more endpoints than the node serves).
"""

from __future__ import annotations

import logging

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException

from adapters.types import UpstreamError
from node.errors import HubError, Kind, UpstreamFailed
from node.storage.records import StoreUnavailable

log = logging.getLogger("aihub.errors")


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message, type, code, param)
        self.headers = headers or {}

    @classmethod
    def from_upstream(cls, exc: UpstreamError) -> ApiError:
        headers = {}
        if exc.retry_after is not None:
            headers["retry-after"] = str(max(1, round(exc.retry_after)))
        code = exc.code or ("rate_limit_exceeded" if exc.status == 429 else None)
        return cls(exc.status, exc.message, type=exc.type, code=code, headers=headers)


# Each kind's status and OpenAI type, as clients have always been told.
_KINDS: dict[Kind, tuple[int, str]] = {
    Kind.INVALID_REQUEST: (400, "invalid_request_error"),
    Kind.UNAUTHENTICATED: (401, "authentication_error"),
    Kind.FORBIDDEN: (403, "permission_error"),
    Kind.REFUSED: (403, "invalid_request_error"),
    Kind.NOT_FOUND: (404, "invalid_request_error"),
    Kind.CONFLICT: (409, "invalid_request_error"),
    Kind.GONE: (410, "invalid_request_error"),
    Kind.TOO_LARGE: (413, "invalid_request_error"),
    Kind.RATE_LIMITED: (429, "rate_limit_error"),
    Kind.OVER_BUDGET: (429, "insufficient_quota"),
    Kind.CLIENT_CLOSED: (499, "invalid_request_error"),  # nginx's status for a client gone
    Kind.INTERNAL: (500, "server_error"),
    Kind.GATEWAY_FAILURE: (502, "upstream_error"),
    Kind.PEER_FAILURE: (502, "invalid_request_error"),
    Kind.UNAVAILABLE: (503, "server_error"),
    Kind.PEER_TIMEOUT: (504, "invalid_request_error"),
}
# A missing or bad API key is answered with the scheme to use.
_CHALLENGE = {"www-authenticate": 'Bearer realm="aihub"'}


def openai_status(exc: HubError) -> int:
    """The HTTP status an OpenAI client is told for a domain error."""
    if isinstance(exc, UpstreamFailed):
        return exc.upstream.status
    return _KINDS[exc.kind][0]


def openai_error(exc: HubError) -> ApiError:
    """A domain error as OpenAI's API would answer it."""
    if isinstance(exc, UpstreamFailed):
        return ApiError.from_upstream(exc.upstream)
    status, type_ = _KINDS[exc.kind]
    headers = dict(exc.limits)
    if exc.retry_after is not None:
        headers["retry-after"] = str(exc.retry_after)
    if exc.kind is Kind.UNAUTHENTICATED and exc.code == "invalid_api_key":
        headers.update(_CHALLENGE)
    return ApiError(
        status, exc.message, type=type_, code=exc.code, param=exc.param, headers=headers
    )


def error_bytes(detail: ErrorDetail) -> bytes:
    return msgspec.json.encode(ErrorBody(detail))


def error_response(exc: ApiError) -> Response[bytes]:
    return Response(
        error_bytes(exc.detail),
        status_code=exc.status,
        media_type="application/json",
        headers=exc.headers,
    )


_HTTP_TYPES = {
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


def handle_api_error(_: Request, exc: ApiError) -> Response[bytes]:
    return error_response(exc)


def handle_hub_error(_: Request, exc: HubError) -> Response[bytes]:
    return error_response(openai_error(exc))


def unsupported_endpoint(request: Request) -> ApiError:
    """What OpenAI's API surface asks of the node that it does not serve (`/v1/audio/…`,
    `/v1/files`, …): an OpenAI-shaped 404 that names the endpoint, so the client's user
    learns the node lacks it rather than that a bare `Not Found` came from somewhere."""
    endpoint = f"{request.method} {request.url.path}"
    message = f"The endpoint {endpoint} is not supported by this node"
    return ApiError(404, message, code="unsupported_endpoint")


def _no_route(request: Request, exc: HTTPException) -> bool:
    # The router sets the scope's handler once a path matches: a 404 without one is a path
    # that no route serves (a handler's own 404 has one).
    return exc.status_code == 404 and request.scope.get("route_handler") is None


def handle_http_exception(request: Request, exc: HTTPException) -> Response[bytes]:
    if _no_route(request, exc) and request.url.path.startswith("/v1/"):
        return error_response(unsupported_endpoint(request))
    status = exc.status_code
    type_, code = _HTTP_TYPES.get(status, ("invalid_request_error", None))
    if status >= 500:
        type_ = "server_error"
    message = exc.detail if isinstance(exc.detail, str) and exc.detail else "request failed"
    if status == 413:
        message = "Request body too large"
    # A 405 names the methods the path takes (`Allow`, RFC 9110): Litestar's router sets it.
    headers = {k: v for k, v in (exc.headers or {}).items() if k.lower() == "allow"}
    return error_response(ApiError(status, message, type=type_, code=code, headers=headers))


def store_unavailable(exc: StoreUnavailable) -> HubError:
    """The database went away (PostgreSQL restarting, unreachable): a 503 the client retries;
    the store reconnects on its own."""
    log.warning("the store is unavailable: %s", exc)
    return HubError(
        Kind.UNAVAILABLE,
        "The node's database cannot be reached now; try again shortly",
        code="store_unavailable",
        retry_after=1,
    )


def handle_store_unavailable(request: Request, exc: StoreUnavailable) -> Response[bytes]:
    return handle_hub_error(request, store_unavailable(exc))


def handle_unexpected(request: Request, exc: Exception) -> Response[bytes]:
    # A bug of ours: log it with its traceback, answer without one.
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(ApiError(500, "Internal error", type="server_error"))


EXCEPTION_HANDLERS = {
    ApiError: handle_api_error,
    HubError: handle_hub_error,
    StoreUnavailable: handle_store_unavailable,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
