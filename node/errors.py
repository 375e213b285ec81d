"""The node's domain errors: what went wrong, in words of the node, not of HTTP.

Budgets, authentication, peering, the books, management and the request pipeline raise a
`HubError` (or a subclass): its `kind` says what sort of failure it is, and it carries the facts
a client needs to act on it (a stable `code`, the `param` at fault, how long to wait, the rate
limit figures). No status code and no API vocabulary: each ingress maps a kind to its own error
shape and status (`node/ingress/errors.py` for OpenAI's), and the CLI prints the message.
"""

from __future__ import annotations

import enum

from adapters.types import UpstreamError


class Kind(enum.Enum):
    INVALID_REQUEST = "invalid request"
    UNAUTHENTICATED = "unauthenticated"
    # The caller may not do this (its key, address or role).
    FORBIDDEN = "forbidden"
    # What is asked is refused as asked (a join, a statement not between us), whoever asks.
    REFUSED = "refused"
    NOT_FOUND = "not found"
    CONFLICT = "conflict"
    GONE = "gone"
    TOO_LARGE = "too large"
    RATE_LIMITED = "rate limited"
    OVER_BUDGET = "over budget"
    CLIENT_CLOSED = "client closed"
    # The node cannot serve this now (busy, or not yet in a state to): try again later.
    UNAVAILABLE = "unavailable"
    # A peer we asked (for the books) answered wrongly, or not in time.
    PEER_FAILURE = "peer failure"
    PEER_TIMEOUT = "peer timeout"
    # The upstream call failed: the adapter's own error is kept (`UpstreamFailed`).
    UPSTREAM_FAILURE = "upstream failure"
    # Something nothing expected broke while a request was served (a bug, or an upstream
    # answer no parser covers).
    GATEWAY_FAILURE = "gateway failure"
    INTERNAL = "internal"


class HubError(Exception):
    """A failure of the node's, with what a client needs to know about it.

    `retry_after` is in whole seconds; `limits` are the rate-limit figures of the tightest
    scope (`x-ratelimit-*` names, as the limiter reports them on every admitted request too).
    """

    def __init__(
        self,
        kind: Kind,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
        limits: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after
        self.limits = limits or {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kind.name}, {self.message!r}, code={self.code!r})"


class UpstreamFailed(HubError):
    """The upstream call failed and no fallback helped. `upstream` is the adapter's error
    (already in OpenAI's vocabulary, as the adapters speak it), kept whole for the ingress
    to tell the client what the provider said."""

    def __init__(self, upstream: UpstreamError) -> None:
        super().__init__(Kind.UPSTREAM_FAILURE, upstream.message, code=upstream.code)
        self.upstream = upstream


def client_closed() -> HubError:
    return HubError(Kind.CLIENT_CLOSED, "Client closed the request", code="client_closed")


def gateway_failure(exc: BaseException) -> HubError:
    """What a client is told of a failure nothing expected: its class, not its traceback
    (that is logged)."""
    return HubError(
        Kind.GATEWAY_FAILURE,
        f"The gateway could not complete the request ({type(exc).__name__})",
        code="gateway_error",
    )
