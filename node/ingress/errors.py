"""OpenAI-shaped errors: `{"error": {"message", "type", "code", "param"}}` on every failure."""

from __future__ import annotations

import logging

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException

from adapters.types import UpstreamError

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


def handle_http_exception(_: Request, exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    type_, code = _HTTP_TYPES.get(status, ("invalid_request_error", None))
    if status >= 500:
        type_ = "server_error"
    message = exc.detail if isinstance(exc.detail, str) and exc.detail else "request failed"
    if status == 413:
        message = "Request body too large"
    return error_response(ApiError(status, message, type=type_, code=code))


def handle_unexpected(request: Request, exc: Exception) -> Response[bytes]:
    # A bug of ours: log it with its traceback, answer without one.
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(ApiError(500, "Internal error", type="server_error"))


EXCEPTION_HANDLERS = {
    ApiError: handle_api_error,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
