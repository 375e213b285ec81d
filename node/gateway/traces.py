"""What a trace of one request holds, as the pipeline knows it when the request settles: the
request itself and each attempt at a deployment or a peer. `node.observe.tracing` turns it
into OpenTelemetry spans; with no tracing configured none of this is made."""

from __future__ import annotations

from typing import Protocol

import msgspec


class AttemptTrace(msgspec.Struct):
    """One try at one deployment (or peer): when, and how it ended (`status` 0: no answer)."""

    deployment: str
    provider: str
    upstream_model: str
    peer: str | None
    start_ns: int
    end_ns: int
    status: int
    error: str | None = None


class RequestTrace(msgspec.Struct):
    request_id: str
    kind: str  # chat | embeddings | completions | images
    model: str
    key_id: str
    start_ns: int
    end_ns: int
    status: int
    stream: bool
    tokens_in: int
    tokens_out: int
    cost_micros: int
    for_peer: bool
    attempts: list[AttemptTrace]
    error: str | None = None
    traceparent: str = ""  # the caller's, as sent: its trace is continued


class Tracer(Protocol):
    def record(self, trace: RequestTrace) -> None:
        """Take a settled request's trace (must not block: it is on the request path)."""
        ...
