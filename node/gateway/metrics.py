"""Prometheus metrics, one registry per app (no process-global state but prometheus_client's
own choice of where values live, below).

Under several workers (`aihub serve --workers N`, the default on a machine with several
cores) each worker is a process of its own, and a scrape reaches whichever accepts the
connection: counted in each process's memory, `/metrics` would answer one worker's share,
another's at the next scrape, a counter going back and forth. So `serve` points
prometheus_client's multiprocess mode at a folder of the node's (`PROMETHEUS_MULTIPROC_DIR`,
`metrics/` in the data folder, emptied at each start) before the workers start: every
counter and histogram is then kept in a memory-mapped file per process, and a scrape answers
the sum of all of them (`MultiProcessCollector`), a worker that died and was replaced
included. The gauges are made when scraped (`node/gateway/metrics_gauges.py`); Python's own
collector figures (`python_gc_*`) describe one process and are left out under several
workers, as prometheus_client does."""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.multiprocess import MultiProcessCollector

from node.gateway.metrics_gauges import (
    MAX_BUDGET_SERIES,
    BudgetGauge,
    PeerGauge,
    ScrapedGauges,
)

__all__ = ["MAX_BUDGET_SERIES", "BudgetGauge", "Metrics", "PeerGauge"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def shared_across_processes() -> bool:
    """Whether this process keeps its metrics' values in the shared folder's files: decided by
    prometheus_client when it is first imported, from the environment `serve` set."""
    return values.ValueClass is not values.MutexValue


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

        # Read from the store when scraped (`set_peers`, `set_budgets`), and the collector's.
        self.scraped = ScrapedGauges()
        self.registry.register(self.scraped)
        # The garbage collector's own counts (python_gc_*): one process's (none under several
        # workers, where prometheus_client's collector does not register).
        GCCollector(registry=self.registry)
        self._rendered = self.registry
        if shared_across_processes():
            # Every worker's counters, summed from their files, and this one's gauges.
            self._rendered = CollectorRegistry(auto_describe=True)
            MultiProcessCollector(self._rendered)
            self._rendered.register(self.scraped)

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
        self.scraped.set_peers(peers)

    def set_budgets(self, budgets: list[BudgetGauge]) -> None:
        self.scraped.set_budgets(budgets)

    def render(self) -> bytes:
        return generate_latest(self._rendered)


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
