"""The gauges of `/metrics` that describe the node as scraped rather than count what it did:
peers' health and budgets, read from the store when a scrape comes (`node/observe/health.py`),
and what the garbage collector froze at startup.

They are made by a collector from the figures last set, as plain values of the process that
answers the scrape. Counters, under several workers, live in files every worker writes
(prometheus_client's multiprocess mode, `node/gateway/metrics.py`), where a gauge would be a
series per process, each as stale as that worker's last scrape: these read the same whichever
worker is asked."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import NamedTuple

from prometheus_client.core import GaugeMetricFamily, Metric

# At most this many keys and tenants get budget series (the most spent first): every series
# is a time series a scraper keeps, and keys are made by the thousand.
MAX_BUDGET_SERIES = 200


class PeerGauge(NamedTuple):
    name: str
    up: bool | None  # None: not checked yet
    latency_ms: int | None


class BudgetGauge(NamedTuple):
    kind: str  # key | tenant
    id: str
    cap: int
    spent: int
    reserved: int


class ScrapedGauges:
    """A prometheus_client collector of the gauges above."""

    def __init__(self) -> None:
        self.peers: list[PeerGauge] = []
        self.budgets: list[BudgetGauge] = []  # the most spent first, at most MAX_BUDGET_SERIES
        self.omitted = 0

    def set_peers(self, peers: list[PeerGauge]) -> None:
        """Each peer's health as last checked (a peer gone since is dropped)."""
        self.peers = list(peers)

    def set_budgets(self, budgets: list[BudgetGauge]) -> None:
        """Budgets and what is spent and reserved of them, the most spent first, at most
        MAX_BUDGET_SERIES of them."""
        ranked = sorted(budgets, key=lambda b: (-b.spent, -b.reserved, b.kind, b.id))
        self.budgets = ranked[:MAX_BUDGET_SERIES]
        self.omitted = max(0, len(ranked) - MAX_BUDGET_SERIES)

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "aihub_peer_up",
            "1 if the peer answered its last health check, 0 if not",
            labels=["peer"],
        )
        latency = GaugeMetricFamily(
            "aihub_peer_latency_seconds",
            "The latency of the peer's last health check",
            labels=["peer"],
        )
        for peer in self.peers:
            if peer.up is None:
                continue
            up.add_metric([peer.name], 1 if peer.up else 0)
            if peer.up and peer.latency_ms is not None:
                latency.add_metric([peer.name], peer.latency_ms / 1000)
        yield from (up, latency)
        labels = ["kind", "id"]
        cap = GaugeMetricFamily(
            "aihub_budget_cap_micros",
            "The budget of a key or tenant for its current period",
            labels=labels,
        )
        spent = GaugeMetricFamily(
            "aihub_budget_spent_micros", "Spent of it this period", labels=labels
        )
        reserved = GaugeMetricFamily(
            "aihub_budget_reserved_micros", "Reserved of it by requests in flight", labels=labels
        )
        for budget in self.budgets:
            cap.add_metric([budget.kind, budget.id], budget.cap)
            spent.add_metric([budget.kind, budget.id], budget.spent)
            reserved.add_metric([budget.kind, budget.id], budget.reserved)
        yield from (cap, spent, reserved)
        yield GaugeMetricFamily(
            "aihub_budget_series_omitted",
            f"Keys and tenants with a budget beyond the {MAX_BUDGET_SERIES} shown",
            value=self.omitted,
        )
        # A frozen count of 0 on a running node means the collector walks startup's objects
        # (node/collector.py).
        yield GaugeMetricFamily(
            "aihub_gc_frozen_objects",
            "Objects moved out of the garbage collector's walks when the node started",
            value=gc.get_freeze_count(),
        )
