"""Prometheus metrics, one registry per app (no process-global state)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


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

        # Labelled children by (metric, labels): prometheus_client's `labels()` validates and
        # locks on every call, a few µs each, five times a request.
        self._children: dict[tuple[Counter | Histogram, tuple[str, ...]], Any] = {}

    def _child(self, metric: Counter | Histogram, *labels: str) -> Any:
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def settled(
        self, endpoint: str, model: str, status: int, tokens_in: int, tokens_out: int, cost: int
    ) -> None:
        """A request's end: counted, with the tokens and cost it was charged."""
        self._child(self.requests, endpoint, model, str(status)).inc()
        if tokens_in:
            self._child(self.tokens, model, "in").inc(tokens_in)
        if tokens_out:
            self._child(self.tokens, model, "out").inc(tokens_out)
        if cost:
            self._child(self.cost, model).inc(cost)

    def untrusted(self, model: str, clamped: bool, unbilled: int) -> None:
        """A request whose counts were clamped, or whose cost passed its reservation."""
        if clamped:
            self._child(self.clamped, model).inc()
        if unbilled:
            self._child(self.unbilled, model).inc(unbilled)

    def answered(self, endpoint: str, model: str, seconds: float) -> None:
        """Time to the answer (to the first byte of a stream)."""
        self._child(self.latency, endpoint, model).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
