"""Usage records (the journal drains into them), in SQLite."""

from __future__ import annotations

import sqlite3
from typing import Literal

import msgspec

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
from node.storage.sqlite.connection import Database
from node.storage.sqlite.spend import read_spend

_json = msgspec.json.encode


class SqliteUsage:
    """Finished requests: their usage records, written with the spend they settle."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def write_batch(self, charges: list[Charge], events: list[AuditEvent]) -> list[SpendRow]:
        """Usage records, the spend they settle and audit events: one transaction, which
        reads the spend rows it settled too (`UsageStore.write_batch`)."""

        def work(db: sqlite3.Connection) -> list[SpendRow]:
            write_charges(db, charges, events)
            return read_spend(db, settled_scopes(charges))

        return await self._db.atomic(work)

    async def usage_since(self, since_ms: int = 0) -> list[UsageRecord]:
        rows = await self._db.fetchall(
            "SELECT * FROM usage WHERE ts_ms >= ? ORDER BY ts_ms", (since_ms,)
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
        rows = await self._db.fetchall(
            f"SELECT {column}, COUNT(*), SUM(u.status >= 400), SUM(u.tokens_in),"
            f" SUM(u.tokens_out), SUM(u.cost_micros), SUM(u.unbilled_micros), SUM(u.clamped)"
            # `+`: grouped without the (key_id, ts_ms) index, which SQLite otherwise walks
            # whole (every request ever) to group by key, instead of the window's rows by ts.
            f" FROM {source} WHERE u.ts_ms >= ? GROUP BY +{column}"
            " ORDER BY SUM(u.cost_micros) DESC, COUNT(*) DESC",
            (since_ms,),
        )
        return [UsageGroup(*row) for row in rows]

    async def usage_series(self, since_ms: int, bucket_ms: int) -> list[SeriesPoint]:
        # Nearest-rank percentiles (the ceil(p * n)-th latency of a bucket), by window
        # functions: no latency leaves the database.
        rows = await self._db.fetchall(
            """
            WITH ranked AS (
                SELECT (ts_ms - :since) / :bucket AS slot, status, tokens_in, tokens_out,
                    cost_micros, latency_ms,
                    ROW_NUMBER() OVER (PARTITION BY (ts_ms - :since) / :bucket
                        ORDER BY latency_ms) AS rank,
                    COUNT(*) OVER (PARTITION BY (ts_ms - :since) / :bucket) AS n
                FROM usage WHERE ts_ms >= :since
            )
            SELECT :since + slot * :bucket, COUNT(*), SUM(status >= 400), SUM(tokens_in),
                SUM(tokens_out), SUM(cost_micros),
                MIN(CASE WHEN rank >= (n * 50 + 99) / 100 THEN latency_ms END),
                MIN(CASE WHEN rank >= (n * 95 + 99) / 100 THEN latency_ms END)
            FROM ranked GROUP BY slot ORDER BY slot
            """,
            {"since": since_ms, "bucket": bucket_ms},
        )
        return [SeriesPoint(*row) for row in rows]


_USAGE_FIELDS = UsageRecord.__struct_fields__

SENT_COLUMNS = "request_id, peer_id, model, price_seq, price_in, price_out, status"

_INSERT_SENT = f"INSERT OR IGNORE INTO peer_requests ({SENT_COLUMNS}) VALUES (?,?,?,?,?,?,?)"

_USAGE_PLACEHOLDERS = ",".join("?" * len(_USAGE_FIELDS))


def _summed_holds(holds: list[tuple[int, Hold]]) -> list[tuple[str, int, str, int, int]]:
    """A batch's (cost, hold) pairs summed per scope, period and holder: (scope, period start,
    holder, amount, cost). A batch is mostly one process's requests in one or two scopes, and
    an UPDATE of the same row for each of them cost ~19 µs a request of the store's thread
    (with its GIL-held binding) where one a row costs next to nothing. The rows come out the
    same: subtracting amounts ≥ 0 one by one, each clamped at 0, or their sum once, clamped."""
    sums: dict[tuple[str, int, str], list[int]] = {}
    for cost, hold in holds:
        entry = sums.setdefault((hold.scope, hold.period_start, hold.holder), [0, 0])
        entry[0] += hold.amount
        entry[1] += cost
    return [(*where, amount, cost) for where, (amount, cost) in sums.items()]


def write_charges(db: sqlite3.Connection, charges: list[Charge], events: list[AuditEvent]) -> None:
    """Write usage records, settle the spend they hold and log audit events. A record already
    written (a journal replayed after a crash that came after its commit) is skipped together
    with its spend, so that writing a charge twice counts it once. Statements run as
    `executemany`: a Python loop here holds the GIL against the event loop's thread."""
    ids = [s.record.request_id for s in charges]
    known: set[str] = set()
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        rows = db.execute(
            f"SELECT request_id FROM usage WHERE request_id IN ({','.join('?' * len(chunk))})",
            chunk,
        )
        known.update(row[0] for row in rows)
    fresh = [s for s in charges if s.record.request_id not in known]
    db.executemany(
        f"INSERT OR IGNORE INTO usage VALUES ({_USAGE_PLACEHOLDERS})",
        [msgspec.structs.astuple(s.record) for s in fresh],
    )
    summed = _summed_holds([(s.record.cost_micros, hold) for s in fresh for hold in s.holds])
    # A hold whose holder's holds were given back (it was killed, and this is its journal
    # replayed) is reserved no more: its request adds its spend only.
    db.executemany(
        "UPDATE spend SET reserved = MAX(reserved - CASE WHEN ? = '' OR EXISTS (SELECT 1"
        " FROM budget_holds h WHERE h.scope = spend.scope AND h.period_start ="
        " spend.period_start AND h.holder = ?) THEN ? ELSE 0 END, 0), spent = spent + ?"
        " WHERE scope = ? AND period_start = ?",
        [
            (holder, holder, amount, cost, scope, start)
            for scope, start, holder, amount, cost in summed
        ],
    )
    db.executemany(
        "UPDATE budget_holds SET amount = MAX(amount - ?, 0)"
        " WHERE scope = ? AND period_start = ? AND holder = ?",
        [(amount, scope, start, holder) for scope, start, holder, amount, _ in summed if holder],
    )
    sent = [s.sent for s in fresh if s.sent is not None]
    if sent:
        db.executemany(_INSERT_SENT, [msgspec.structs.astuple(request) for request in sent])
    if events:
        db.executemany(
            "INSERT INTO audit (ts_ms, actor, action, target, ip, detail) VALUES (?,?,?,?,?,?)",
            [(e.ts_ms, e.actor, e.action, e.target, e.ip, _json(e.detail)) for e in events],
        )
