"""Usage records (the journal drains into them), in PostgreSQL."""

from __future__ import annotations

from typing import Literal

import asyncpg
import msgspec

from node.storage.postgres.connection import Database
from node.storage.postgres.spend import read_spend
from node.storage.records import (
    AuditEvent,
    Charge,
    Hold,
    SeriesPoint,
    SpendRow,
    UsageGroup,
    UsageRecord,
    settled_scopes,
)
from node.storage.rows import json_text

_USAGE_FIELDS = UsageRecord.__struct_fields__

SENT_COLUMNS = "request_id, peer_id, model, price_seq, price_in, price_out, status"

# Each column's type, in UsageRecord's order: the batch goes in as one array per column.
_USAGE_TYPES = {
    "request_id": "text",
    "ts_ms": "bigint",
    "key_id": "text",
    "tenant_id": "text",
    "model": "text",
    "deployment": "text",
    "provider": "text",
    "endpoint": "text",
    "stream": "bigint",
    "tokens_in": "bigint",
    "tokens_out": "bigint",
    "estimated": "bigint",
    "cost_micros": "bigint",
    "latency_ms": "bigint",
    "status": "bigint",
    "error": "text",
    "unbilled_micros": "bigint",
    "clamped": "bigint",
    "cache_hit": "bigint",
    "log_id": "text",
}
if tuple(_USAGE_TYPES) != _USAGE_FIELDS:  # a field added to UsageRecord must be typed here
    raise ImportError("postgres/usage.py: _USAGE_TYPES does not match UsageRecord's fields")

_INSERT_USAGE = (
    f"INSERT INTO usage ({', '.join(_USAGE_FIELDS)}) SELECT * FROM unnest("
    + ", ".join(f"${n}::{kind}[]" for n, kind in enumerate(_USAGE_TYPES.values(), start=1))
    + ") ON CONFLICT (request_id) DO NOTHING RETURNING request_id"
)

_INSERT_SENT = (
    f"INSERT INTO peer_requests ({SENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
    " ON CONFLICT DO NOTHING"
)


def usage_values(record: UsageRecord) -> tuple:
    """A usage record as its row (flags as 0 or 1)."""
    return tuple(
        int(value) if isinstance(value, bool) else value
        for value in msgspec.structs.astuple(record)
    )


class PostgresUsage:
    """Finished requests: their usage records, written with the spend they settle."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def write_batch(self, charges: list[Charge], events: list[AuditEvent]) -> list[SpendRow]:
        """Usage records, the spend they settle and audit events: one transaction, which
        reads the spend rows it settled too (`UsageStore.write_batch`)."""

        async def work(db: asyncpg.Connection) -> list[SpendRow]:
            await write_charges(db, charges, events)
            return await read_spend(db, settled_scopes(charges))

        return await self._db.atomic(work)

    async def usage_since(self, since_ms: int = 0) -> list[UsageRecord]:
        rows = await self._db.fetch(
            f"SELECT {', '.join(_USAGE_FIELDS)} FROM usage WHERE ts_ms >= $1 ORDER BY ts_ms",
            since_ms,
        )
        return [
            msgspec.convert(dict(zip(_USAGE_FIELDS, row, strict=True)), UsageRecord, strict=False)
            for row in rows
        ]

    async def usage_report(
        self, by: Literal["key", "tenant", "model", "peer"], since_ms: int
    ) -> list[UsageGroup]:
        if by == "peer":
            # The requests we routed to a peer are those with a `peer_requests` row.
            source = "usage u JOIN peer_requests p ON p.request_id = u.request_id"
            column = "p.peer_id"
        else:
            source = "usage u"
            column = {"key": "u.key_id", "tenant": "u.tenant_id", "model": "u.model"}[by]
        rows = await self._db.fetch(
            f"SELECT {column}, COUNT(*), SUM((u.status >= 400)::int), SUM(u.tokens_in),"
            f" SUM(u.tokens_out), SUM(u.cost_micros), SUM(u.unbilled_micros), SUM(u.clamped)"
            f" FROM {source} WHERE u.ts_ms >= $1 GROUP BY {column}"
            " ORDER BY SUM(u.cost_micros) DESC, COUNT(*) DESC",
            since_ms,
        )
        return [UsageGroup(row[0], *(int(value) for value in row[1:])) for row in rows]

    async def usage_series(self, since_ms: int, bucket_ms: int) -> list[SeriesPoint]:
        # Nearest-rank percentiles, as SQLite's: percentile_disc is the smallest latency whose
        # cumulative share reaches p, the ceil(p * n)-th; no latency leaves the database.
        rows = await self._db.fetch(
            "SELECT $1::bigint + slot * $2::bigint, COUNT(*), SUM((status >= 400)::int),"
            " SUM(tokens_in), SUM(tokens_out), SUM(cost_micros),"
            " percentile_disc(0.5) WITHIN GROUP (ORDER BY latency_ms),"
            " percentile_disc(0.95) WITHIN GROUP (ORDER BY latency_ms)"
            " FROM (SELECT (ts_ms - $1::bigint) / $2::bigint AS slot, status, tokens_in,"
            " tokens_out, cost_micros, latency_ms FROM usage WHERE ts_ms >= $1::bigint) AS b"
            " GROUP BY slot ORDER BY slot",
            since_ms,
            bucket_ms,
        )
        return [
            SeriesPoint(*(None if value is None else int(value) for value in row)) for row in rows
        ]


# The batch's holds, one array per column: each hold's scope, period, holder, amount reserved
# and the cost its request settles.
_HOLDS = (
    "given AS (SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[],"
    " $5::bigint[]) AS g (scope, period_start, holder, amount, cost))"
)

# Each spend row settled by one update however many of the batch's requests it settles (a
# busy key's row would otherwise get a new version per request): the sums, which come to the
# same (max(max(r - a, 0) - b, 0) = max(r - a - b, 0) for amounts that are not negative). A
# hold's amount leaves `reserved` only while its holder's hold is there: one given back (its
# holder was killed, and this is its journal replayed) is reserved no more, and its request
# adds its spend only. Then the holders' holds shrink by what was theirs. One statement, run
# once the spend rows are locked, so that its snapshot sees every hold a prune gave back.
_SETTLE = (
    "WITH " + _HOLDS + ","
    " rows AS (SELECT scope, period_start, SUM(cost) AS spent, SUM(amount) FILTER (WHERE"
    " holder = '' OR EXISTS (SELECT 1 FROM budget_holds h WHERE h.scope = given.scope"
    " AND h.period_start = given.period_start AND h.holder = given.holder)) AS reserved"
    " FROM given GROUP BY scope, period_start),"
    " settled AS (UPDATE spend SET reserved = GREATEST(spend.reserved"
    " - COALESCE(rows.reserved, 0), 0), spent = spend.spent + rows.spent FROM rows"
    " WHERE spend.scope = rows.scope AND spend.period_start = rows.period_start),"
    " mine AS (SELECT scope, period_start, holder, SUM(amount) AS amount FROM given"
    " WHERE holder != '' GROUP BY scope, period_start, holder)"
    " UPDATE budget_holds SET amount = GREATEST(budget_holds.amount - mine.amount, 0) FROM mine"
    " WHERE budget_holds.scope = mine.scope AND budget_holds.period_start = mine.period_start"
    " AND budget_holds.holder = mine.holder"
)


async def _settle(db: asyncpg.Connection, holds: list[tuple[int, Hold]]) -> None:
    """Move each hold from reserved to spent (its request's cost): the spend rows locked in
    the order a reservation locks them, then settled with the holders' holds (`_SETTLE`), two
    round trips whatever the batch holds."""
    if not holds:
        return
    ordered = sorted(holds, key=lambda item: (item[1].scope, item[1].period_start, item[1].holder))
    # Locked before the holds are read: a prune giving back a killed holder's holds locks
    # these rows first too, so it cannot give one back between this read and the update.
    await db.execute(
        "SELECT 1 FROM spend WHERE (scope, period_start) IN"
        " (SELECT * FROM unnest($1::text[], $2::bigint[]))"
        " ORDER BY scope, period_start FOR UPDATE",
        [h.scope for _, h in ordered],
        [h.period_start for _, h in ordered],
    )
    await db.execute(
        _SETTLE,
        [h.scope for _, h in ordered],
        [h.period_start for _, h in ordered],
        [h.holder for _, h in ordered],
        [h.amount for _, h in ordered],
        [cost for cost, _ in ordered],
    )


async def write_charges(
    db: asyncpg.Connection, charges: list[Charge], events: list[AuditEvent]
) -> None:
    """Write usage records, settle the spend they hold and log audit events. A record already
    written (a journal replayed after a crash that came after its commit, or another process's
    copy) is skipped together with its spend: the insert answers which records are new, so
    that writing a charge twice counts it once. The spend rows are updated in one order, the
    order a reservation locks them in, so that the two never wait on each other."""
    if charges:
        columns = list(zip(*(usage_values(charge.record) for charge in charges), strict=True))
        fresh_ids = {row[0] for row in await db.fetch(_INSERT_USAGE, *map(list, columns))}
        fresh = [c for c in charges if c.record.request_id in fresh_ids]
        await _settle(db, [(c.record.cost_micros, hold) for c in fresh for hold in c.holds])
        sent = [c.sent for c in fresh if c.sent is not None]
        if sent:
            await db.executemany(
                _INSERT_SENT, [msgspec.structs.astuple(request) for request in sent]
            )
    if events:
        await db.executemany(
            "INSERT INTO audit (ts_ms, actor, action, target, ip, detail)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            [(e.ts_ms, e.actor, e.action, e.target, e.ip, json_text(e.detail)) for e in events],
        )
