"""Budgets and leases, in PostgreSQL: spend per scope and period, reservations, alert claims,
rate counts and parallel slots."""

from __future__ import annotations

import time

import asyncpg

from node.storage.postgres.connection import Database, lock_key
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

# The scopes' rows are locked first, in one order (so that two reservations, or a
# reservation and a settlement, never wait on each other), and read as they are once locked:
# READ COMMITTED hands `FOR UPDATE` the row's newest version. Then all are reserved or none.
# The sum is taken as numeric: a cap near 2^63 must not overflow into an error.
_RESERVE = (
    "WITH held AS (SELECT scope, period_start, cap, spent, reserved FROM spend"
    " WHERE (scope, period_start) IN (SELECT * FROM unnest($2::text[], $3::bigint[]))"
    " ORDER BY scope, period_start FOR UPDATE)"
    " UPDATE spend SET reserved = spend.reserved + $1 FROM held"
    " WHERE spend.scope = held.scope AND spend.period_start = held.period_start"
    " AND NOT EXISTS (SELECT 1 FROM held"
    " WHERE held.spent::numeric + held.reserved + $1 > held.cap)"
)

# The reservation and its holder's note of it, in one statement: no BEGIN or COMMIT round trip,
# and no spend row stays locked while a round trip to the node is under way. The spend rows are
# locked first (`held` is whole before anything is updated: the `NOT EXISTS` reads all of it),
# then the holds, as every writer locks them; the holds are noted only for rows reserved, which
# are all of them or none.
_RESERVE_COUNTED = "WITH reserved AS (" + _RESERVE + " RETURNING 1) SELECT count(*) FROM reserved"

# A hold's expiry is kept in the database's clock, which every host shares (two hosts' clocks
# may differ by more than the margin a process keeps below HOLD_TTL: `node/gateway/budgets.py`).
# A time a caller gives is in its own clock: what is kept is the database's now plus the
# caller's offset from its own now (none, unless a test moves time).
DB_NOW = "extract(epoch FROM clock_timestamp())::bigint"

_RESERVE_NOTED = (
    "WITH reserved AS (" + _RESERVE + " RETURNING spend.scope, spend.period_start),"
    " noted AS (INSERT INTO budget_holds"
    " SELECT scope, period_start, $4, $1, " + DB_NOW + " + $5 FROM reserved"
    " ORDER BY scope, period_start"
    " ON CONFLICT (scope, period_start, holder) DO UPDATE"
    " SET amount = budget_holds.amount + excluded.amount, expires = excluded.expires)"
    " SELECT count(*) FROM reserved"
)

# What a holder gives back of a lease: at most what its hold still has (nothing, if its holds
# were given back for it: it could not renew in time). The spend row is locked first, in the
# order every writer locks it.
_RELEASE_HELD = (
    "WITH held AS (SELECT LEAST(amount, $3) AS amount FROM budget_holds"
    " WHERE scope = $1 AND period_start = $2 AND holder = $4 FOR UPDATE),"
    " taken AS (UPDATE budget_holds SET amount = budget_holds.amount - held.amount FROM held"
    " WHERE scope = $1 AND period_start = $2 AND holder = $4)"
    " UPDATE spend SET reserved = GREATEST(reserved - held.amount, 0) FROM held"
    " WHERE scope = $1 AND period_start = $2"
)

_ADD_RATE = (
    "INSERT INTO rate_counts VALUES ($1, $2, $3, $4) ON CONFLICT (scope, kind, second)"
    " DO UPDATE SET amount = rate_counts.amount + excluded.amount"
)


def _columns(scopes: list[tuple[str, int]]) -> tuple[list[str], list[int]]:
    return [scope for scope, _ in scopes], [start for _, start in scopes]


async def read_spend(db: asyncpg.Connection, scopes: list[tuple[str, int]]) -> list[SpendRow]:
    """The spend rows of `scopes`, in the transaction `db` is in."""
    if not scopes:
        return []
    rows = await db.fetch(
        "SELECT scope, period_start, cap, spent, reserved FROM spend"
        " WHERE (scope, period_start) IN (SELECT * FROM unnest($1::text[], $2::bigint[]))",
        *_columns(scopes),
    )
    return [SpendRow(*row) for row in rows]


class PostgresSpend:
    """What each scope spent and holds reserved per period, the alerts claimed, and the
    rate-limit leases shared by every process."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def open_periods(self, rows: list[tuple[str, int, int]]) -> None:
        """Make sure each (scope, period start) row exists and carries the current cap."""
        await self._db.execute_many(
            "INSERT INTO spend (scope, period_start, cap) VALUES ($1, $2, $3)"
            " ON CONFLICT (scope, period_start) DO UPDATE SET cap = excluded.cap",
            sorted(rows),
        )

    async def reserve(self, amount: int, scopes: list[tuple[str, int]], holder: str = "") -> bool:
        """Reserve `amount` in every scope, or in none if any would pass its cap, and note it
        as the holder's: one statement (autocommit) decides, atomic against every other
        reservation of every process, and its row locks last only as long as it runs."""
        scope_names, starts = _columns(scopes)
        reserved = await self._db.fetchval(
            _RESERVE_NOTED if holder else _RESERVE_COUNTED,
            amount,
            scope_names,
            starts,
            *((holder, HOLD_TTL) if holder else ()),
        )
        return reserved == len(scopes)

    async def release(self, leases: list[tuple[int, tuple[str, int]]], holder: str = "") -> None:
        """Give back reserved budget that no request will use: (amount, (scope, start))."""
        rows = sorted((scope, start, amount) for amount, (scope, start) in leases)

        async def work(db: asyncpg.Connection) -> None:
            if not holder:
                await db.executemany(
                    "UPDATE spend SET reserved = GREATEST(reserved - $3, 0)"
                    " WHERE scope = $1 AND period_start = $2",
                    rows,
                )
                return
            await db.execute(
                "SELECT 1 FROM spend WHERE (scope, period_start) IN"
                " (SELECT * FROM unnest($1::text[], $2::bigint[]))"
                " ORDER BY scope, period_start FOR UPDATE",
                [scope for scope, _, _ in rows],
                [start for _, start, _ in rows],
            )
            await db.executemany(_RELEASE_HELD, [(*row, holder) for row in rows])

        if rows:
            await self._db.atomic(work)

    async def renew_holds(self, holder: str, now: int) -> set[tuple[str, int]]:
        """The holder is alive: what it holds stays its own for HOLD_TTL seconds from `now`
        (kept in the database's clock); the (scope, period start) of each hold it still
        has (one missing was given back: the holder could not renew in time)."""
        rows = await self._db.fetch(
            "UPDATE budget_holds SET expires = " + DB_NOW + " + $1 WHERE holder = $2"
            " RETURNING scope, period_start",
            now + HOLD_TTL - int(time.time()),
            holder,
        )
        return {(row[0], row[1]) for row in rows}

    async def release_all_reservations(self) -> None:
        """No request of any process is in flight (the SQLite node's start; on PostgreSQL,
        `aihub serve` never calls this: other hosts may be serving)."""

        async def work(db: asyncpg.Connection) -> None:
            await db.execute("UPDATE spend SET reserved = 0 WHERE reserved != 0")
            await db.execute("DELETE FROM budget_holds")

        await self._db.atomic(work)

    async def spend(self, scopes: list[tuple[str, int]]) -> list[SpendRow]:
        if not scopes:
            return []
        return await self._db.run(lambda db: read_spend(db, scopes))  # one statement

    async def claim_alert(self, scope: str, period_start: int, threshold: int) -> bool:
        """True the first time a threshold is reached in a period, False ever after."""
        claimed = await self._db.execute(
            "INSERT INTO alerts VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            scope,
            period_start,
            threshold,
            now_ms(),
        )
        return claimed == 1

    async def rate_sync(self, sync: RateSync) -> RateAnswer:
        """Apply one process's rate-limit bookkeeping and grant its takes, in one transaction:
        every take gets at least one, or none does. The scopes taken from are locked (an
        advisory lock each, in one order) for the length of it, so that two processes never
        both grant the last of a limit."""
        return await self._db.atomic(lambda db: _rate_sync(db, sync))

    async def release_slots(self, holder: str) -> None:
        """A process stops: the parallel slots it held come back at once."""
        await self._db.execute("DELETE FROM parallel_slots WHERE holder = $1", holder)


async def _rate_sync(db: asyncpg.Connection, sync: RateSync) -> RateAnswer:
    now, holder = sync.now, sync.holder
    locks = sorted({lock_key("rate", take.scope, take.kind) for take in sync.takes})
    if locks:
        await db.execute("SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) k", locks)
    if sync.returns:
        await db.executemany(
            "UPDATE rate_counts SET amount = GREATEST(amount - $1, 0)"
            " WHERE scope = $2 AND kind = 'requests' AND second = $3",
            sorted((amount, scope, second) for scope, second, amount in sync.returns),
        )
    if sync.tokens:
        await db.executemany(
            _ADD_RATE, sorted((scope, "tokens", second, n) for scope, second, n in sync.tokens)
        )
    lost = await _renew_slots(db, holder, sorted(sync.slots), now) if sync.slots else []
    used = [await _rate_used(db, take, now) for take in sync.takes]
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
            await _grant(db, take, granted, holder, now)
    else:
        take = sync.takes[refused]
        answer.buckets[take.scope] = await _buckets(db, take.scope, take.kind, now)
    for scope in sync.read:
        answer.buckets[scope] = await _buckets(db, scope, "tokens", now)
    return answer


async def _renew_slots(
    db: asyncpg.Connection, holder: str, slots: list[tuple[str, int, int]], now: int
) -> list[str]:
    """The holder's slots set to what it holds now and renewed where they are still its own
    (not expired); where they are not, it holds again those in flight. The scopes where they
    were not (and it held some)."""
    expires = now + SLOT_TTL
    renewed = await db.fetch(
        "UPDATE parallel_slots p SET slots = g.slots, expires = $3::bigint"
        " FROM unnest($1::text[], $2::bigint[]) AS g (scope, slots)"
        " WHERE p.scope = g.scope AND p.holder = $4::text AND p.expires >= $5::bigint"
        " RETURNING p.scope",
        [scope for scope, _, _ in slots],
        [count for _, count, _ in slots],
        expires,
        holder,
        now,
    )
    kept = {row[0] for row in renewed}
    again = [(scope, holder, running, expires) for scope, _, running in slots if running]
    again = [row for row in again if row[0] not in kept]
    if again:
        await db.executemany(
            "INSERT INTO parallel_slots VALUES ($1, $2, $3, $4) ON CONFLICT (scope, holder)"
            " DO UPDATE SET slots = excluded.slots, expires = excluded.expires",
            again,
        )
    return [scope for scope, count, _ in slots if count and scope not in kept]


async def _rate_used(db: asyncpg.Connection, take: RateTake, now: int) -> int:
    if take.kind == "parallel":
        sql = (
            "SELECT COALESCE(SUM(slots), 0) FROM parallel_slots WHERE scope = $1 AND expires >= $2"
        )
        return int(await db.fetchval(sql, take.scope, now))
    sql = (
        "SELECT COALESCE(SUM(amount), 0) FROM rate_counts"
        " WHERE scope = $1 AND kind = $2 AND second >= $3"
    )
    return int(await db.fetchval(sql, take.scope, take.kind, now - RATE_WINDOW))


async def _grant(
    db: asyncpg.Connection, take: RateTake, granted: int, holder: str, now: int
) -> None:
    if take.kind == "parallel":
        # Slots of this holder's row that expired are no longer its: start again from none.
        await db.execute(
            "INSERT INTO parallel_slots VALUES ($1, $2, $3, $4) ON CONFLICT (scope, holder)"
            " DO UPDATE SET slots = CASE WHEN parallel_slots.expires >= $5"
            " THEN parallel_slots.slots ELSE 0 END + excluded.slots, expires = excluded.expires",
            take.scope,
            holder,
            granted,
            now + SLOT_TTL,
            now,
        )
    else:
        await db.execute(_ADD_RATE, take.scope, take.kind, now, granted)


async def _buckets(
    db: asyncpg.Connection, scope: str, kind: str, now: int
) -> list[tuple[int, int]]:
    rows = await db.fetch(
        "SELECT second, amount FROM rate_counts WHERE scope = $1 AND kind = $2"
        " AND second >= $3 AND amount > 0 ORDER BY second",
        scope,
        kind,
        now - RATE_WINDOW,
    )
    return [(int(second), int(amount)) for second, amount in rows]


async def prune_leases(db: asyncpg.Connection, now: int) -> None:
    """Forget rate counts older than any window reads, and parallel slots that expired; give
    back what processes that stopped renewing their budget holds held. The spend rows are
    locked first, in the order every writer locks them, then the expired holds deleted (a
    hold renewed meanwhile is no longer expired, and stays), then their sums given back."""
    await db.execute("DELETE FROM rate_counts WHERE second < $1", now - 2 * RATE_WINDOW)
    await db.execute("DELETE FROM parallel_slots WHERE expires < $1", now)
    # Holds expire in the database's clock (`_RESERVE_NOTED`); `now`, the caller's, is an offset.
    expired = DB_NOW + " + $1"
    offset = now - int(time.time())
    await db.execute(
        "SELECT 1 FROM spend WHERE (scope, period_start) IN (SELECT scope, period_start"
        f" FROM budget_holds WHERE expires < {expired}) ORDER BY scope, period_start FOR UPDATE",
        offset,
    )
    await db.execute(
        f"WITH gone AS (DELETE FROM budget_holds WHERE expires < {expired}"
        " RETURNING scope, period_start, amount),"
        " sums AS (SELECT scope, period_start, SUM(amount) AS amount FROM gone"
        " GROUP BY scope, period_start)"
        " UPDATE spend SET reserved = GREATEST(spend.reserved - sums.amount, 0) FROM sums"
        " WHERE spend.scope = sums.scope AND spend.period_start = sums.period_start",
        offset,
    )
