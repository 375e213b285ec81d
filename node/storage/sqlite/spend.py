"""Budgets and leases, in SQLite: spend per scope and period, reservations, alert claims, rate
counts and parallel slots."""

from __future__ import annotations

import sqlite3
import time

from node.storage.records import (
    HOLD_TTL,
    RATE_WINDOW,
    SLOT_TTL,
    RateAnswer,
    RateSync,
    RateTake,
    SpendRow,
    now_ms,
)
from node.storage.sqlite.connection import Database


def _scopes_match(count: int) -> str:
    """A condition that holds for `count` (scope, period start) pairs, the parameters in
    that order: equalities joined by OR, which SQLite answers with a primary-key search
    each, for a reservation's few scopes (SQLite parses at most ~1,000 of them). `(scope,
    period_start) IN (VALUES ...)` of two pairs or more read the whole of `spend`, a row
    per scope and period ever."""
    return "(" + " OR ".join(["(scope = ? AND period_start = ?)"] * count) + ")"


def read_spend(db: sqlite3.Connection, scopes: list[tuple[str, int]]) -> list[SpendRow]:
    """The spend rows of `scopes`, in the transaction `db` is in. A join from the pairs
    (a usage batch's may be a thousand): a primary-key search each."""
    pairs = list(dict.fromkeys(scopes))
    if not pairs:
        return []
    rows = db.execute(
        "SELECT s.scope, s.period_start, s.cap, s.spent, s.reserved"
        f" FROM (VALUES {', '.join(['(?, ?)'] * len(pairs))}) AS v"
        " JOIN spend AS s ON s.scope = v.column1 AND s.period_start = v.column2",
        [part for pair in pairs for part in pair],
    )
    return [SpendRow(*row) for row in rows]


class SqliteSpend:
    """What each scope spent and holds reserved per period, the alerts claimed, and the
    rate-limit leases shared by every process."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def open_periods(self, rows: list[tuple[str, int, int]]) -> None:
        """Make sure each (scope, period start) row exists and carries the current cap."""
        await self._db.execute_many(
            "INSERT INTO spend (scope, period_start, cap) VALUES (?, ?, ?)"
            " ON CONFLICT (scope, period_start) DO UPDATE SET cap = excluded.cap",
            rows,
        )

    async def reserve(self, amount: int, scopes: list[tuple[str, int]], holder: str = "") -> bool:
        """Reserve `amount` in every scope, or in none if any would pass its cap, and note it
        as the holder's.

        One statement decides, so that it is atomic against every other reservation, in this
        process or another: concurrent requests can never take a budget past its cap.
        """
        match = _scopes_match(len(scopes))
        flat = [part for scope in scopes for part in scope]

        def work(db: sqlite3.Connection) -> bool:
            changed = db.execute(
                f"UPDATE spend SET reserved = reserved + ?"
                f" WHERE {match} AND NOT EXISTS"
                f" (SELECT 1 FROM spend WHERE {match} AND spent + reserved + ? > cap)",
                [amount, *flat, *flat, amount],
            ).rowcount
            if changed == len(scopes) and holder:
                expires = int(time.time()) + HOLD_TTL
                db.executemany(
                    "INSERT INTO budget_holds VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (scope, period_start, holder) DO UPDATE"
                    " SET amount = amount + excluded.amount, expires = excluded.expires",
                    [(scope, start, holder, amount, expires) for scope, start in scopes],
                )
            return changed == len(scopes)

        return await self._db.atomic(work)

    async def release(self, leases: list[tuple[int, tuple[str, int]]], holder: str = "") -> None:
        """Give back reserved budget that no request will use: (amount, (scope, start))."""

        def work(db: sqlite3.Connection) -> None:
            for amount, (scope, start) in leases:
                if holder:
                    # At most what the hold still has: what was given back for the holder
                    # already (it could not renew in time) is not given back twice.
                    row = db.execute(
                        "SELECT amount FROM budget_holds"
                        " WHERE scope = ? AND period_start = ? AND holder = ?",
                        (scope, start, holder),
                    ).fetchone()
                    amount = min(amount, row[0]) if row else 0
                    db.execute(
                        "UPDATE budget_holds SET amount = amount - ?"
                        " WHERE scope = ? AND period_start = ? AND holder = ?",
                        (amount, scope, start, holder),
                    )
                db.execute(
                    "UPDATE spend SET reserved = MAX(reserved - ?, 0)"
                    " WHERE scope = ? AND period_start = ?",
                    (amount, scope, start),
                )

        await self._db.atomic(work)

    async def renew_holds(self, holder: str, now: int) -> set[tuple[str, int]]:
        """The holder is alive: what it holds stays its own until `now + HOLD_TTL`; the
        (scope, period start) of each hold it still has (one missing was given back: the
        holder could not renew in time)."""

        def work(db: sqlite3.Connection) -> set[tuple[str, int]]:
            rows = db.execute(
                "UPDATE budget_holds SET expires = ? WHERE holder = ?"
                " RETURNING scope, period_start",
                (now + HOLD_TTL, holder),
            ).fetchall()
            return {(scope, start) for scope, start in rows}

        return await self._db.atomic(work)

    async def release_all_reservations(self) -> None:
        """At start-up no request is in flight: what is still reserved was lost in a crash."""

        def work(db: sqlite3.Connection) -> None:
            db.execute("UPDATE spend SET reserved = 0 WHERE reserved != 0")
            db.execute("DELETE FROM budget_holds")

        await self._db.atomic(work)

    async def spend(self, scopes: list[tuple[str, int]]) -> list[SpendRow]:
        if not scopes:
            return []
        return await self._db.atomic(lambda db: read_spend(db, scopes), write=False)

    async def claim_alert(self, scope: str, period_start: int, threshold: int) -> bool:
        """True the first time a threshold is reached in a period, False ever after."""
        claimed = await self._db.execute(
            "INSERT OR IGNORE INTO alerts VALUES (?, ?, ?, ?)",
            (scope, period_start, threshold, now_ms()),
        )
        return claimed == 1

    async def rate_sync(self, sync: RateSync) -> RateAnswer:
        """Apply one process's rate-limit bookkeeping and grant its takes, in one transaction:
        every take gets at least one, or none does."""
        return await self._db.atomic(lambda db: _rate_sync(db, sync), inline=True)

    async def release_slots(self, holder: str) -> None:
        """A process stops: the parallel slots it held come back at once."""
        await self._db.execute("DELETE FROM parallel_slots WHERE holder = ?", (holder,))


def _rate_sync(db: sqlite3.Connection, sync: RateSync) -> RateAnswer:
    now, holder = sync.now, sync.holder
    db.executemany(
        "UPDATE rate_counts SET amount = MAX(amount - ?, 0)"
        " WHERE scope = ? AND kind = 'requests' AND second = ?",
        [(amount, scope, second) for scope, second, amount in sync.returns],
    )
    db.executemany(_ADD_RATE, [(scope, "tokens", second, n) for scope, second, n in sync.tokens])
    lost = [scope for scope, *held in sync.slots if not _renew_slots(db, holder, scope, *held, now)]
    used = [_rate_used(db, take, now) for take in sync.takes]
    refused = next(
        (i for i, take in enumerate(sync.takes) if used[i] >= take.limit),
        None,
    )
    answer = RateAnswer(granted=[0] * len(sync.takes), used=used, refused=refused, lost=lost)
    if refused is None:
        answer.granted = [
            min(take.want, take.limit - held) for take, held in zip(sync.takes, used, strict=True)
        ]
        for take, granted in zip(sync.takes, answer.granted, strict=True):
            _grant(db, take, granted, holder, now)
    else:
        take = sync.takes[refused]
        answer.buckets[take.scope] = _buckets(db, take.scope, take.kind, now)
    for scope in sync.read:
        answer.buckets[scope] = _buckets(db, scope, "tokens", now)
    return answer


def _renew_slots(
    db: sqlite3.Connection, holder: str, scope: str, slots: int, in_flight: int, now: int
) -> bool:
    """The holder's slots of `scope` set to `slots` and renewed if they are still its own
    (not expired), and whether they were; else it holds again those in flight."""
    expires = now + SLOT_TTL
    renewed = db.execute(
        "UPDATE parallel_slots SET slots = ?, expires = ?"
        " WHERE scope = ? AND holder = ? AND expires >= ?",
        (slots, expires, scope, holder, now),
    ).rowcount
    if renewed:
        return True
    if in_flight:
        db.execute(
            "INSERT INTO parallel_slots VALUES (?, ?, ?, ?) ON CONFLICT (scope, holder)"
            " DO UPDATE SET slots = excluded.slots, expires = excluded.expires",
            (scope, holder, in_flight, expires),
        )
    return slots == 0


_ADD_RATE = (
    "INSERT INTO rate_counts VALUES (?, ?, ?, ?) ON CONFLICT (scope, kind, second)"
    " DO UPDATE SET amount = amount + excluded.amount"
)


def _rate_used(db: sqlite3.Connection, take: RateTake, now: int) -> int:
    if take.kind == "parallel":
        sql = "SELECT COALESCE(SUM(slots), 0) FROM parallel_slots WHERE scope = ? AND expires >= ?"
        return int(db.execute(sql, (take.scope, now)).fetchone()[0])
    sql = (
        "SELECT COALESCE(SUM(amount), 0) FROM rate_counts"
        " WHERE scope = ? AND kind = ? AND second >= ?"
    )
    return int(db.execute(sql, (take.scope, take.kind, now - RATE_WINDOW)).fetchone()[0])


def _grant(db: sqlite3.Connection, take: RateTake, granted: int, holder: str, now: int) -> None:
    if take.kind == "parallel":
        # Slots of this holder's row that expired are no longer its: start again from none.
        db.execute(
            "INSERT INTO parallel_slots VALUES (?, ?, ?, ?) ON CONFLICT (scope, holder)"
            " DO UPDATE SET slots = IIF(expires >= ?, slots, 0) + excluded.slots,"
            " expires = excluded.expires",
            (take.scope, holder, granted, now + SLOT_TTL, now),
        )
    else:
        db.execute(_ADD_RATE, (take.scope, take.kind, now, granted))


def _buckets(db: sqlite3.Connection, scope: str, kind: str, now: int) -> list[tuple[int, int]]:
    rows = db.execute(
        "SELECT second, amount FROM rate_counts WHERE scope = ? AND kind = ? AND second >= ?"
        " AND amount > 0 ORDER BY second",
        (scope, kind, now - RATE_WINDOW),
    ).fetchall()
    return [(int(second), int(amount)) for second, amount in rows]


def prune_leases(db: sqlite3.Connection, now: int) -> None:
    """Forget rate counts older than any window reads, and parallel slots that expired; give
    back what processes that stopped renewing their budget holds held."""
    db.execute("DELETE FROM rate_counts WHERE second < ?", (now - 2 * RATE_WINDOW,))
    db.execute("DELETE FROM parallel_slots WHERE expires < ?", (now,))
    db.execute(
        "UPDATE spend SET reserved = MAX(reserved - (SELECT SUM(amount) FROM budget_holds h"
        " WHERE h.scope = spend.scope AND h.period_start = spend.period_start"
        " AND h.expires < ?), 0)"
        # The expired holds' rows, found by the holds' expiry index; `WHERE EXISTS` read
        # every row of `spend` at every prune, in a write transaction.
        " WHERE (scope, period_start) IN"
        " (SELECT scope, period_start FROM budget_holds WHERE expires < ?)",
        (now, now),
    )
    db.execute("DELETE FROM budget_holds WHERE expires < ?", (now,))
