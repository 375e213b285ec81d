"""Budget alerts: when a key or tenant passes a threshold of its budget (50, 80, 100 % by
default), once per budget period, an event goes to the audit log and to the configured
webhook, retried with doubling backoff. All of it runs after usage is written, off the
request path.

An alert says what it is based on (`basis`): `spent`, what was actually spent reached the
threshold; `refused`, a request was refused because what is spent and reserved (by requests
in flight) leaves too little for it, so the budget is used up for practical purposes although
less than all of it is spent: the alert carries both figures. A request refused while nothing
is spent or reserved (one request larger than the whole budget) raises no alert at all."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine

import httpx
import msgspec

from node.config import AlertsSection
from node.storage.base import Store
from node.storage.records import AuditEvent, Charge, SpendRow, now_ms, settled_scopes

log = logging.getLogger("aihub.alerts")


class BudgetAlert(msgspec.Struct, tag_field="event", tag="budget.threshold"):
    node: str
    scope: str
    threshold: int
    spent_micros: int
    cap_micros: int
    period_start: int
    ts: int
    basis: str = "spent"
    reserved_micros: int = 0


def thresholds_passed(row: SpendRow, thresholds: list[int]) -> list[int]:
    """The thresholds (percent) that `row`'s spend has reached."""
    if row.cap <= 0:
        return sorted(thresholds)
    return sorted(t for t in thresholds if row.spent * 100 >= row.cap * t)


class BudgetAlerts:
    def __init__(
        self,
        settings: AlertsSection,
        store: Store,
        client: httpx.AsyncClient,
        node_name: str,
        audit: Callable[[AuditEvent], None],
    ) -> None:
        self.settings = settings
        self.store = store
        self.client = client
        self.node_name = node_name
        self.audit = audit
        self._tasks: set[asyncio.Task[None]] = set()
        self._claimed: set[tuple[str, int, int]] = set()

    async def on_settled(self, charges: list[Charge], spend: list[SpendRow] | None) -> None:
        """Charges written: the thresholds their scopes passed, from the spend rows the
        batch's transaction read (`UsageStore.write_batch`), else read now."""
        if spend is None:
            spend = await self.store.spend.spend(settled_scopes(charges))
        await self.check(spend)

    def exhausted(self, scopes: list[tuple[str, int]]) -> None:
        """A request was refused for budget: 100 % on the `refused` basis, if anything is
        spent or reserved (`_exhausted`)."""
        if 100 not in self.settings.thresholds:
            return
        fresh = [scope for scope in scopes if (*scope, 100) not in self._claimed]
        if fresh:
            self._background(self._exhausted(fresh))

    async def _exhausted(self, scopes: list[tuple[str, int]]) -> None:
        for row in await self.store.spend.spend(scopes):
            if row.spent + row.reserved > 0:
                await self._raise(row, 100, "refused")

    def _background(self, work: Coroutine[None, None, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def check(self, rows: list[SpendRow]) -> None:
        for row in rows:
            for threshold in thresholds_passed(row, self.settings.thresholds):
                await self._raise(row, threshold)

    async def _raise(self, row: SpendRow, threshold: int, basis: str = "spent") -> None:
        claim = (row.scope, row.period_start, threshold)
        if threshold not in self.settings.thresholds or claim in self._claimed:
            return
        # Remembered here so that a flood of refused requests costs no database work.
        self._claimed.add(claim)
        if not await self.store.spend.claim_alert(*claim):
            return
        alert = BudgetAlert(
            node=self.node_name,
            scope=row.scope,
            threshold=threshold,
            spent_micros=row.spent,
            cap_micros=row.cap,
            period_start=row.period_start,
            ts=int(time.time()),
            basis=basis,
            reserved_micros=row.reserved,
        )
        self.audit(
            AuditEvent(
                now_ms(),
                "budget.alert",
                None,
                row.scope,
                None,
                {
                    "threshold": threshold,
                    "basis": basis,
                    "spent_micros": row.spent,
                    "reserved_micros": row.reserved,
                    "cap_micros": row.cap,
                },
            )
        )
        if self.settings.webhook_url:
            self._background(self._deliver(alert))

    async def _deliver(self, alert: BudgetAlert) -> None:
        body = msgspec.json.encode(alert)
        headers = {"content-type": "application/json", "user-agent": "aihub-alerts"}
        delay = self.settings.backoff_base
        for attempt in range(self.settings.retries + 1):
            try:
                response = await self.client.post(
                    self.settings.webhook_url, content=body, headers=headers, timeout=10
                )
                if response.status_code < 300:
                    self._delivered(alert, "budget.alert_delivered", attempt + 1)
                    return
                reason = f"status {response.status_code}"
            except httpx.HTTPError as exc:
                reason = type(exc).__name__
            log.warning("budget alert webhook failed (%s), attempt %d", reason, attempt + 1)
            if attempt < self.settings.retries:
                await asyncio.sleep(delay)
                delay *= 2
        self._delivered(alert, "budget.alert_failed", self.settings.retries + 1)

    def _delivered(self, alert: BudgetAlert, action: str, attempts: int) -> None:
        detail: dict[str, str | int | None] = {"threshold": alert.threshold, "attempts": attempts}
        self.audit(AuditEvent(now_ms(), action, None, alert.scope, None, detail))

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
