"""Prometheus metrics, one registry per app (no process-global state)."""

from __future__ import annotations

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

    def render(self) -> bytes:
        return generate_latest(self.registry)
