"""Prometheus metrics, one registry per app (no process-global state)."""

from __future__ import annotations

import gc
from typing import Any, NamedTuple

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
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


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "aihub_requests",
            "Requests answered, by endpoint, model and status",
            ["endpoint", "model", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "aihub_request_duration_seconds",
            "Time to answer (to the first byte for streams)",
            ["endpoint", "model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "aihub_tokens",
            "Tokens processed, by model and direction (in|out)",
            ["model", "direction"],
            registry=self.registry,
        )
        self.cost = Counter(
            "aihub_cost_micros",
            "Cost charged, in micro-units of the node's currency",
            ["model"],
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "aihub_upstream_errors",
            "Failed upstream attempts, by deployment and upstream status (0: no answer)",
            ["deployment", "status"],
            registry=self.registry,
        )
        self.clamped = Counter(
            "aihub_usage_clamped",
            "Requests whose upstream token counts passed what the request could use (clamped)",
            ["model"],
            registry=self.registry,
        )
        self.unbilled = Counter(
            "aihub_unbilled_micros",
            "Cost beyond the reservation, not charged (the charge is capped at the reservation)",
            ["model"],
            registry=self.registry,
        )

        self.cache_lookups = Counter(
            "aihub_cache_lookups",
            "Response cache lookups of requests the cache is on for, by result (hit|miss)",
            ["result"],
            registry=self.registry,
        )

        # Read from the store when scraped (`set_peers`, `set_budgets`).
        self.peer_up = Gauge(
            "aihub_peer_up",
            "1 if the peer answered its last health check, 0 if not",
            ["peer"],
            registry=self.registry,
        )
        self.peer_latency = Gauge(
            "aihub_peer_latency_seconds",
            "The latency of the peer's last health check",
            ["peer"],
            registry=self.registry,
        )
        budget_labels = ["kind", "id"]
        self.budget_cap = Gauge(
            "aihub_budget_cap_micros",
            "The budget of a key or tenant for its current period",
            budget_labels,
            registry=self.registry,
        )
        self.budget_spent = Gauge(
            "aihub_budget_spent_micros",
            "Spent of it this period",
            budget_labels,
            registry=self.registry,
        )
        self.budget_reserved = Gauge(
            "aihub_budget_reserved_micros",
            "Reserved of it by requests in flight",
            budget_labels,
            registry=self.registry,
        )
        self.budget_omitted = Gauge(
            "aihub_budget_series_omitted",
            f"Keys and tenants with a budget beyond the {MAX_BUDGET_SERIES} shown",
            registry=self.registry,
        )
        # The collector's own counts (python_gc_*), and what node/collector.py froze at startup:
        # a frozen count of 0 on a running node means the collector walks startup's objects.
        GCCollector(registry=self.registry)
        frozen = Gauge(
            "aihub_gc_frozen_objects",
            "Objects moved out of the garbage collector's walks when the node started",
            registry=self.registry,
        )
        frozen.set_function(gc.get_freeze_count)

        # Labelled children by (metric, labels): prometheus_client's `labels()` validates and
        # locks on every call, a few µs each. Bounded (`_remember`): the labels are the
        # client's model names, and a cache must not grow with them where the registry's
        # own series would not.
        self._children: dict[tuple[Counter | Histogram, tuple[str, ...]], Any] = {}
        # A request's end, by (endpoint, model, status): its counters' children in one
        # lookup (`_Settled`), where they were four, each hashing a tuple of its labels.
        self._settled: dict[tuple[str, str, int], _Settled] = {}

    def _child(self, metric: Counter | Histogram, *labels: str) -> Any:
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = _remember(self._children, key, metric.labels(*labels))
        return child

    def cache_lookup(self, hit: bool) -> None:
        self._child(self.cache_lookups, "hit" if hit else "miss").inc()

    def settled(
        self, endpoint: str, model: str, status: int, tokens_in: int, tokens_out: int, cost: int
    ) -> None:
        """A request's end: counted, with the tokens and cost it was charged."""
        key = (endpoint, model, status)
        ended = self._settled.get(key)
        if ended is None:
            counted = self._child(self.requests, endpoint, model, str(status))
            ended = _remember(self._settled, key, _Settled(counted))
        ended.requests.inc()
        # The token and cost children inline, looked up on first use (`_Settled`).
        if tokens_in:
            child = ended.tokens_in
            if child is None:
                child = ended.tokens_in = self._child(self.tokens, model, "in")
            child.inc(tokens_in)
        if tokens_out:
            child = ended.tokens_out
            if child is None:
                child = ended.tokens_out = self._child(self.tokens, model, "out")
            child.inc(tokens_out)
        if cost:
            child = ended.cost
            if child is None:
                child = ended.cost = self._child(self.cost, model)
            child.inc(cost)

    def untrusted(self, model: str, clamped: bool, unbilled: int) -> None:
        """A request whose counts were clamped, or whose cost passed its reservation."""
        if clamped:
            self._child(self.clamped, model).inc()
        if unbilled:
            self._child(self.unbilled, model).inc(unbilled)

    def answered(self, endpoint: str, model: str, seconds: float) -> None:
        """Time to the answer (to the first byte of a stream)."""
        self._child(self.latency, endpoint, model).observe(seconds)

    def set_peers(self, peers: list[PeerGauge]) -> None:
        """Each peer's health as last checked (a peer gone since is dropped)."""
        self.peer_up.clear()
        self.peer_latency.clear()
        for peer in peers:
            if peer.up is None:
                continue
            self.peer_up.labels(peer.name).set(1 if peer.up else 0)
            if peer.up and peer.latency_ms is not None:
                self.peer_latency.labels(peer.name).set(peer.latency_ms / 1000)

    def set_budgets(self, budgets: list[BudgetGauge]) -> None:
        """Budgets and what is spent and reserved of them, the most spent first, at most
        MAX_BUDGET_SERIES of them."""
        for gauge in (self.budget_cap, self.budget_spent, self.budget_reserved):
            gauge.clear()
        ranked = sorted(budgets, key=lambda b: (-b.spent, -b.reserved, b.kind, b.id))
        for budget in ranked[:MAX_BUDGET_SERIES]:
            labels = (budget.kind, budget.id)
            self.budget_cap.labels(*labels).set(budget.cap)
            self.budget_spent.labels(*labels).set(budget.spent)
            self.budget_reserved.labels(*labels).set(budget.reserved)
        self.budget_omitted.set(max(0, len(ranked) - MAX_BUDGET_SERIES))

    def render(self) -> bytes:
        return generate_latest(self.registry)


# At most this many entries in each of `Metrics`' caches of children: far more than the
# (endpoint, model, status) a node answers with, so that in use none is ever dropped.
MAX_CACHED_CHILDREN = 1024


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> Any:
    """`value` kept in `cache` under `key`, the cache emptied first once full: what it holds
    is found again by `labels()` (the registry's series are unchanged), only slower."""
    if len(cache) >= MAX_CACHED_CHILDREN:
        cache.clear()
    cache[key] = value
    return value


class _Settled:
    """The children one (endpoint, model, status) counts a request's end in. The token and
    cost children stay None until first used (`Metrics.settled`): a series is made by its
    lookup, and one for a model that has never used tokens (its requests all refused) would
    show a count of zero that was not there before."""

    __slots__ = ("cost", "requests", "tokens_in", "tokens_out")

    def __init__(self, requests: Any) -> None:
        self.requests = requests
        self.tokens_in: Any = None
        self.tokens_out: Any = None
        self.cost: Any = None
