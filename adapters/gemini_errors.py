"""Google's errors as the gateway's: the Gemini API's and Vertex AI's answers
`{"error": {"code", "message", "status", "details"}}`, and the same object sent as a stream
event after a 200.

The HTTP status decides what the router does (429 and 5xx retried, a 400 answered at once),
with two corrections Google's body allows: a `RetryInfo` detail's `retryDelay` is the wait a
429 asks for (bounded like a Retry-After), and a bad key (`API_KEY_INVALID`), a permission
refused or a `FAILED_PRECONDITION` (billing, region) is the deployment's fault, answered 502
and not retried, so that another deployment may serve. Codes are OpenAI's where it has one
(`rate_limit_exceeded`, `model_not_found`, `context_length_exceeded`), else Google's own.
"""

from __future__ import annotations

import re

import msgspec

from adapters.gemini_wire import ErrorBody, ErrorStatus
from adapters.http import UpstreamClient, UpstreamResponse, build_request, send
from adapters.types import Upstream, UpstreamError, error_status_for, sane_wait

_error_decoder = msgspec.json.Decoder(ErrorBody)

# The HTTP status Google gives each canonical code, for an error that arrives inside a stream
# (which has already answered 200) with only its `status`.
_STATUS_OF_CODE = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNKNOWN": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
# Reasons (ErrorInfo) and codes that say the deployment's key, billing or region is wrong:
# Google answers them 400, but no client can fix them, and another deployment may serve.
_DEPLOYMENT_REASONS = frozenset({"API_KEY_INVALID", "API_KEY_SERVICE_BLOCKED", "SERVICE_DISABLED"})
_DEPLOYMENT_CODES = frozenset({"FAILED_PRECONDITION", "UNAUTHENTICATED", "PERMISSION_DENIED"})
# `The input token count (1234567) exceeds the maximum number of tokens allowed (1048576).`
_TOO_LONG = re.compile(r"input token count.*exceeds the maximum", re.IGNORECASE)
# A protobuf Duration in JSON: `37s`, `1.5s`.
_DURATION = re.compile(r"(\d{1,9}(?:\.\d{1,9})?)s")


def google_error(body: bytes) -> ErrorStatus | None:
    """Google's error (`{"error": {...}}`) in `body`, or None if the body is not one."""
    try:
        status = _error_decoder.decode(body).error
    except (msgspec.DecodeError, RecursionError):
        return None
    if status is None or not (status.status or status.code):
        return None
    return status


def retry_delay(status: ErrorStatus) -> float | None:
    """The wait a `RetryInfo` detail asks for, in seconds (untrusted: bounded)."""
    for detail in status.details:
        if detail.type.endswith("google.rpc.RetryInfo") and detail.retry_delay:
            text = detail.retry_delay.strip()
            if len(text) <= 24 and _DURATION.fullmatch(text):
                return sane_wait(float(text[:-1]))
    return None


def _openai_code(status: ErrorStatus) -> str | None:
    """OpenAI's code for the same failure where it has one, else Google's own, lower-cased."""
    if status.status == "RESOURCE_EXHAUSTED":
        return "rate_limit_exceeded"
    if status.status == "NOT_FOUND" and "model" in status.message.lower():
        return "model_not_found"
    if _TOO_LONG.search(status.message):
        return "context_length_exceeded"
    reason = next((d.reason for d in status.details if d.reason), None)
    return (reason or status.status).lower() or None


def _deployment_fault(status: ErrorStatus) -> bool:
    reasons = {detail.reason for detail in status.details}
    return bool(reasons & _DEPLOYMENT_REASONS) or status.status in _DEPLOYMENT_CODES


def google_failure(upstream: Upstream, http_status: int, status: ErrorStatus) -> UpstreamError:
    """Google's error (an answer's or a stream event's) as the gateway's error."""
    client_status, retryable = error_status_for(http_status)
    if _deployment_fault(status) and client_status < 500:
        client_status, retryable = 502, False
    where = f"{upstream.provider} upstream answered {http_status}"
    detail = status.message or status.status
    return UpstreamError(
        client_status,
        f"{where}: {detail}" if detail else where,
        type="invalid_request_error" if client_status in (400, 404, 413, 422) else "upstream_error",
        code=_openai_code(status),
        retryable=retryable,
        retry_after=retry_delay(status),
        upstream_status=http_status,
    )


class ErrorReader:
    """`send`'s error parser that keeps Google's decoded error, so that the adapter can then
    read what a message and a code cannot carry (RetryInfo, ErrorInfo)."""

    def __init__(self) -> None:
        self.status: ErrorStatus | None = None

    def __call__(self, body: bytes) -> tuple[str, str | None]:
        self.status = google_error(body)
        if self.status is None or not self.status.message:
            return body[:500].decode(errors="replace").strip(), None
        return self.status.message, _openai_code(self.status)

    def refine(self, upstream: Upstream, error: UpstreamError) -> UpstreamError:
        if self.status is None or error.upstream_status is None:
            return error
        refined = google_failure(upstream, error.upstream_status, self.status)
        if refined.retry_after is None:
            refined.retry_after = error.retry_after  # a Retry-After header, if Google sent one
        return refined


async def send_to_google(
    client: UpstreamClient,
    upstream: Upstream,
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    stream: bool = False,
    reader: ErrorReader | None = None,
) -> UpstreamResponse:
    """POST to a Google API; its error answers read as Google's (by `reader`)."""
    reader = reader or ErrorReader()
    request = build_request(upstream, url, body, headers)
    return await send(
        client,
        upstream,
        request,
        stream=stream,
        parse_error=reader,
        refine_error=lambda error, _headers: reader.refine(upstream, error),
    )


def error_event(upstream: Upstream, status: ErrorStatus) -> UpstreamError:
    """An error sent inside a 200 answer (a stream's event, mostly): classed by its code, or
    its status, as the same error would be as an HTTP answer."""
    http_status = status.code if 400 <= status.code <= 599 else 0
    http_status = http_status or _STATUS_OF_CODE.get(status.status, 500)
    error = google_failure(upstream, http_status, status)
    error.message = f"{upstream.provider} upstream failed mid-answer: {status.message}"
    return error
