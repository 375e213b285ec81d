"""Interaction logs as the admin API and `aihub logs` show them (no Litestar here: the CLI
prints them too): the filter read from words, an entry's view with its bodies as text."""

from __future__ import annotations

import msgspec

from node.storage.records import InteractionLog, LogFilter
from node.units import parse_since

LOGS_LIMIT_MAX = 1000
DEFAULT_LOGS_SINCE = "7d"


class LogSummary(msgspec.Struct):
    """One entry in a list: what it was, without its bodies."""

    request_id: str
    ts_ms: int
    key_id: str | None
    tenant_id: str | None
    model: str
    endpoint: str
    deployment: str | None
    peer: str | None
    stream: bool
    status: int
    tokens_in: int
    tokens_out: int
    cost_micros: int
    latency_ms: int
    cache_hit: bool
    error: str | None
    truncated: bool


class LogEntry(LogSummary):
    """One entry whole: its bodies as the JSON texts they were, the guardrails' findings."""

    request: str
    response: str
    findings: msgspec.Raw


class LogList(msgspec.Struct):
    logs: list[LogSummary]


def summary(entry: InteractionLog) -> LogSummary:
    fields = {name: getattr(entry, name) for name in LogSummary.__struct_fields__}
    return LogSummary(**fields)


def whole(entry: InteractionLog) -> LogEntry:
    fields = {name: getattr(entry, name) for name in LogSummary.__struct_fields__}
    return LogEntry(
        **fields,
        request=entry.request.decode(errors="replace"),
        response=entry.response.decode(errors="replace"),
        findings=msgspec.Raw(entry.findings or b"[]"),
    )


def log_filter(
    *,
    key: str | None,
    tenant: str | None,
    model: str | None,
    status: str | None,
    since: str,
    until: str | None,
    limit: str,
) -> LogFilter:
    """The filter from its words (ValueError naming the one that is wrong)."""
    if not limit.isascii() or not limit.isdigit() or not 1 <= int(limit) <= LOGS_LIMIT_MAX:
        raise ValueError(f"limit: 1 to {LOGS_LIMIT_MAX}, not {limit!r}")
    code = None
    if status is not None:
        if not status.isascii() or not status.isdigit() or not 100 <= int(status) <= 599:
            raise ValueError(f"status: an HTTP status from 100 to 599, not {status!r}")
        code = int(status)
    try:
        since_ms = parse_since(since)
    except ValueError as exc:
        raise ValueError(f"since: {exc}") from None
    until_ms = None
    if until is not None:
        try:
            until_ms = parse_since(until)
        except ValueError as exc:
            raise ValueError(f"until: {exc}") from None
    return LogFilter(
        key_id=key or None,
        tenant_id=tenant or None,
        model=model or None,
        status=code,
        since_ms=since_ms,
        until_ms=until_ms,
        limit=int(limit),
    )
