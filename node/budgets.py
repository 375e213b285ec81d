"""No overspend: reserve the worst-case cost before the upstream call, settle after.

Each key and tenant with a budget has one `spend` row per budget period. A reservation is one
atomic SQL statement over all the rows a request is charged to (`Store.reserve`), so any
number of concurrent requests, in any number of worker processes, can never take a budget past
its cap. The settlement (actual cost in, reservation out) is written in the same transaction
as the request's usage record.
"""

from __future__ import annotations

import time

from node.auth import Principal
from node.errors import ApiError
from node.policy import Limits, period_start
from node.storage import Hold, Store


def budget_scopes(principal: Principal) -> list[tuple[str, Limits]]:
    """The (scope, limits) pairs a request by this principal is charged to."""
    scopes = [(f"key:{principal.key.id}", principal.key.limits)]
    if principal.tenant is not None:
        scopes.append((f"tenant:{principal.tenant.id}", principal.tenant.limits))
    return scopes


class Budgets:
    def __init__(self, store: Store) -> None:
        self.store = store
        # (scope, period start, cap) rows known to exist with that cap: opened once a period.
        self._opened: set[tuple[str, int, int]] = set()

    def forget(self) -> None:
        """Caps may have changed (keys reloaded): re-open rows on their next use."""
        self._opened.clear()

    def periods(self, principal: Principal, now: float) -> list[tuple[str, int, int]]:
        return [
            (scope, period_start(limits.budget_period, now), limits.budget_micros)
            for scope, limits in budget_scopes(principal)
            if limits.budget_micros is not None
        ]

    async def reserve(self, principal: Principal, amount: int) -> list[Hold]:
        """Hold `amount` in every budget on the request's path, or raise a 429."""
        rows = self.periods(principal, time.time())
        if not rows:
            return []
        fresh = [row for row in rows if row not in self._opened]
        if fresh:
            await self.store.open_periods(fresh)
            self._opened.update(fresh)
        scopes = [(scope, start) for scope, start, _ in rows]
        if not await self.store.reserve(amount, scopes):
            raise ApiError(
                429,
                "Budget exceeded: this request could cost up to "
                f"{amount} micro-units, more than is left in the budget of "
                + " or ".join(scope for scope, _ in scopes),
                type="insufficient_quota",
                code="insufficient_quota",
            )
        return [Hold(scope, start, amount) for scope, start in scopes]
