"""No overspend: reserve the worst-case cost before the upstream call, settle after.

Each key and tenant with a budget has one `spend` row per budget period. Budget is reserved in
the database only by one atomic SQL statement (`store.spend.reserve`), so the processes serving a
node can never, together, take a budget past its cap.

A process does not go to the database for every request, though: it reserves a **lease** (a
slice of what is left: a tenth, or 64 requests' worth, whichever is less) and hands out
reservations from it in memory, checking and taking in one step with no await between, so
that concurrent requests in the process never promise more than it holds. A lease that runs
low is topped up in the background while requests keep taking from what is left, so that a
busy process's requests seldom wait on the database for one. When a request
settles, its actual cost moves from reserved to spent in the database (in the same batched
transaction as its usage record) and the rest of its reservation returns to the lease. Leases
are given back when the process stops, when keys change, and at start-up (`aihub serve`
on SQLite releases anything a crashed process held). What a process reserves is noted as its
own (`holder`), and it renews that every few seconds (`renew`): when a process is killed, the
others give back what it held once its holds expire (`HOLD_TTL`), without a restart, on
PostgreSQL as on SQLite.

A lease is used only while this process's last successful renewal began less than
`LEASE_FRESH` seconds ago, a margin below `HOLD_TTL`: a process that cannot renew (the
database away, or this process cut off from it) stops promising from its leases before any
other process may give them back. Past that, a request asks the database (a renewal first,
which says which holds are still this process's: the leases of the others are dropped), and
is refused as unavailable while the database cannot be reached.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable

from node import units
from node.errors import HubError, Kind
from node.gateway.auth import Principal
from node.gateway.policy import Limits, period_start
from node.storage.base import Store
from node.storage.records import HOLD_TTL, Hold

log = logging.getLogger("aihub.budgets")


def budget_scopes(principal: Principal) -> tuple[tuple[str, Limits], ...]:
    """The (scope, limits) pairs a request by this principal is charged to (worked out once
    per principal: `Principal.scopes`)."""
    return principal.scopes


def scope_names(principal: Principal) -> dict[str, str]:
    """Each budget scope as a person knows it: the key or tenant by its name (a peer's key is
    named `peer:NAME`), not by its internal id."""
    names = {f"key:{principal.key.id}": f"key `{principal.key.name}`"}
    if principal.tenant is not None:
        names[f"tenant:{principal.tenant.id}"] = f"tenant `{principal.tenant.name}`"
    return names


# Leases are promised from for this long after the start of the last renewal that found
# them held: HOLD_TTL (15 s, after which others may give them back) less a margin for the
# renewal's own round trip and a busy event loop. Renewals run every 5 s (`node/hub.py`).
LEASE_FRESH = 10.0
assert LEASE_FRESH < HOLD_TTL

LEASE_REQUESTS = 64  # a lease covers this many requests like the one that takes it…
LEASE_SHARE = 10  # …but at most a tenth of the cap, so that other processes get their share
# Once a lease holds less than a quarter of what a new one would, it is topped up in the
# background: requests keep taking from what is left meanwhile, and seldom wait on the
# database (where another process may hold the scope's spend row locked) for a lease.
LEASE_LOW = 4

Scope = tuple[str, int]  # (scope, period start)


class Budgets:
    def __init__(
        self, store: Store, currency: str = "USD", clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.store = store
        self.currency = currency  # what a refusal states amounts in
        self._clock = clock  # for LEASE_FRESH (a test moves it)
        # This process, in the store's budget holds.
        self.holder = secrets.token_hex(8)
        # (scope, period start, cap) rows known to exist with that cap: opened once a period.
        self._opened: set[tuple[str, int, int]] = set()
        # Reserved in the database and not yet promised to a request, per scope and period.
        self._leases: dict[Scope, int] = {}
        self._refill = asyncio.Lock()
        self._releases: set[asyncio.Task[None]] = set()
        self._topping: asyncio.Task[None] | None = None  # the background top-up, if one runs
        # Until when (by the clock) the leases may be promised from (LEASE_FRESH).
        self._fresh_until = 0.0

    def forget(self) -> None:
        """Caps may have changed (keys reloaded): give the leases back and re-open rows on
        their next use, so that new leases are taken under the new caps. Leases no longer
        fresh may have been given back already: they are dropped, and come back (if they
        were not) when their holds expire."""
        self._opened.clear()
        leases, self._leases = self._leases, {}
        if self._clock() >= self._fresh_until:
            return
        task = asyncio.get_running_loop().create_task(self._release(leases))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, leases: dict[Scope, int]) -> None:
        unused = [(amount, scope) for scope, amount in leases.items() if amount > 0]
        if unused:
            await self.store.spend.release(unused, self.holder)

    async def renew(self) -> None:
        """Tell the store this process is alive (every few seconds), and promise from the
        leases for LEASE_FRESH seconds from now. A lease whose hold was given back meanwhile
        (the process could not renew for `HOLD_TTL`: the database was away) is reserved no
        more: it is dropped, and a new one taken when needed."""
        async with self._refill:  # no lease is taken meanwhile, so none is lost
            await self._renew()

    async def _renew(self) -> None:
        started = self._clock()
        held = await self.store.spend.renew_holds(self.holder, int(time.time()))
        self._leases = {scope: amount for scope, amount in self._leases.items() if scope in held}
        self._fresh_until = started + LEASE_FRESH

    async def release(self) -> None:
        """Give every lease back (the process stops)."""
        if self._topping is not None:
            await asyncio.gather(self._topping, return_exceptions=True)
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
        leases, self._leases = self._leases, {}
        await self._release(leases)

    def periods(self, principal: Principal, now: float) -> list[tuple[str, int, int]]:
        return [
            (scope, period_start(limits.budget_period, now), limits.budget_micros or 0)
            for scope, limits in principal.budgeted
        ]

    def _take(self, scopes: list[Scope], amount: int) -> bool:
        """Promise `amount` from every scope's lease, or from none (and from none while the
        leases are not fresh). No await: atomic within the process."""
        leases = self._leases
        if self._clock() >= self._fresh_until:
            return False
        for scope in scopes:  # not `any` over a generator: a call a scope, and one more
            if leases.get(scope, 0) < amount:
                return False
        for scope in scopes:
            leases[scope] -= amount
        return True

    async def reserve(self, principal: Principal, amount: int) -> list[Hold]:
        """Hold `amount` in every budget on the request's path, or raise that it is over budget."""
        rows = self.periods(principal, time.time())
        if not rows:
            return []
        scopes = [(scope, start) for scope, start, _ in rows]
        if not self._take(scopes, amount):
            async with self._refill:
                refused = await self._lease(rows, amount)
            if refused is not None:
                scope, cap = refused
                raise _exceeded(amount, scope, cap, self.currency, principal)
        self._top_up_if_low(rows, amount)
        return [Hold(scope, start, amount, self.holder) for scope, start in scopes]

    def _top_up_if_low(self, rows: list[tuple[str, int, int]], amount: int) -> None:
        """Start topping the leases up in the background once one runs low (LEASE_LOW), unless
        a top-up or a refill is under way already."""
        if self._topping is not None or self._refill.locked():
            return
        for scope, start, cap in rows:  # not `any` over a generator, as in `_take`
            if self._low(scope, start, cap, amount):
                self._topping = asyncio.get_running_loop().create_task(self._top_up(rows, amount))
                self._topping.add_done_callback(self._topped)
                return

    def _low(self, scope: str, start: int, cap: int, amount: int) -> bool:
        chunk = _chunk(amount, cap)
        return chunk >= amount and self._leases.get((scope, start), 0) < chunk // LEASE_LOW

    def _topped(self, task: asyncio.Task[None]) -> None:
        self._topping = None
        if not task.cancelled() and task.exception() is not None:
            # The request path asks the database itself when the lease runs out, and says why.
            log.debug("topping up a budget lease failed: %s", task.exception())

    async def _top_up(self, rows: list[tuple[str, int, int]], amount: int) -> None:
        """A new lease on each scope that runs low, of the size `_lease` takes; nothing near
        a cap (a lease of that size is refused: the request path then takes what it needs, no
        more), and nothing once the leases are not fresh (the request path renews first)."""
        async with self._refill:
            for scope, start, cap in rows:
                if self._clock() >= self._fresh_until:
                    return
                if not self._low(scope, start, cap, amount):
                    continue
                chunk = _chunk(amount, cap)
                if await self.store.spend.reserve(chunk, [(scope, start)], self.holder):
                    self._leases[(scope, start)] = self._leases.get((scope, start), 0) + chunk

    async def left(self, principal: Principal) -> int | None:
        """The least that any budget on the principal's path has left to reserve (what the
        database holds neither spent nor reserved, and this process's lease of it), or None
        if none has a cap. A figure of the moment: only `reserve` takes it, atomically."""
        rows = self.periods(principal, time.time())
        if not rows:
            return None
        scopes = [(scope, start) for scope, start, _ in rows]
        async with self._refill:
            fresh = [row for row in rows if row not in self._opened]
            if fresh:
                await self.store.spend.open_periods(fresh)
                self._opened.update(fresh)
            found = {(r.scope, r.period_start): r for r in await self.store.spend.spend(scopes)}
        least = None
        for scope, start, cap in rows:
            row = found.get((scope, start))
            free = cap if row is None else row.cap - row.spent - row.reserved
            free += self._leases.get((scope, start), 0)
            least = free if least is None else min(least, free)
        return max(least or 0, 0)

    async def _lease(self, rows: list[tuple[str, int, int]], amount: int) -> tuple[str, int] | None:
        """Top the leases up until `amount` can be taken from each; None once it is, else
        the (scope, cap) that has not that much left."""
        scopes = [(scope, start) for scope, start, _ in rows]
        fresh = [row for row in rows if row not in self._opened]
        if fresh:
            await self.store.spend.open_periods(fresh)
            self._opened.update(fresh)
        # Other requests of this process may take from a lease while we wait for the database:
        # top up, then take in one step, until it holds or the database says no.
        while not self._take(scopes, amount):
            if self._clock() >= self._fresh_until:
                await self._renew()  # which leases are still ours, before any is promised
                continue
            for scope, start, cap in rows:
                short = amount - self._leases.get((scope, start), 0)
                if short <= 0:
                    continue
                chunk = max(short, _chunk(amount, cap))
                if not await self.store.spend.reserve(chunk, [(scope, start)], self.holder):
                    if chunk == short or not await self.store.spend.reserve(
                        short, [(scope, start)], self.holder
                    ):
                        return scope, cap
                    chunk = short
                self._leases[(scope, start)] = self._leases.get((scope, start), 0) + chunk
        return None

    def settle(self, holds: list[Hold], cost: int) -> list[Hold]:
        """A request is done and cost `cost`: the holds whose amounts the database moves from
        reserved to spent (the cost, up to each hold), while the rest of each hold returns to
        its lease. The pipeline never charges more than a hold (`Accounting.finish` caps
        the charge at the reservation), so spent never passes a cap."""
        moved = []
        for hold in holds:
            used = min(cost, hold.amount)
            scope = (hold.scope, hold.period_start)
            self._leases[scope] = self._leases.get(scope, 0) + hold.amount - used
            moved.append(Hold(hold.scope, hold.period_start, used, hold.holder))
        return moved


def _chunk(amount: int, cap: int) -> int:
    """The lease a request of `amount` takes under `cap`, when that much is left."""
    return min(amount * LEASE_REQUESTS, cap // LEASE_SHARE)


def _exceeded(amount: int, scope: str, cap: int, currency: str, principal: Principal) -> HubError:
    """The refusal, in the node's currency, naming the budget that has not enough left."""
    limits = dict(budget_scopes(principal)).get(scope)
    period = f"{limits.budget_period} " if limits is not None else ""
    name = scope_names(principal).get(scope, scope)
    return HubError(
        Kind.OVER_BUDGET,
        f"Budget exceeded: this request could cost up to {units.amount(amount, currency)}, "
        f"more than is left of the {period}budget of {units.amount(cap, currency)} of {name}",
        code="insufficient_quota",
    )
