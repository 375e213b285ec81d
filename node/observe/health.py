"""Liveness, readiness and the Prometheus metrics: what a load balancer and a scraper ask."""

from __future__ import annotations

import logging
import time

import msgspec
from litestar import Request, Response, get

from node import __version__
from node.gateway.metrics import BudgetGauge, PeerGauge
from node.gateway.policy import period_start
from node.hub import hub_of
from node.storage.base import Store

log = logging.getLogger("aihub.metrics")

JSON = "application/json"
# Prometheus' text format, version 0.0.4 (what `prometheus_client` renders); Litestar adds
# `; charset=utf-8` to a text type itself.
METRICS_TYPE = "text/plain; version=0.0.4"


class Health(msgspec.Struct):
    status: str
    node: str | None = None
    version: str = __version__


@get("/health/live")
async def live(request: Request) -> Response[bytes]:
    """The process answers (nothing else is asked: a store that is down is /health/ready's)."""
    health = Health("ok", hub_of(request).config.node.name)
    return Response(msgspec.json.encode(health), media_type=JSON)


@get("/health/ready")
async def ready(request: Request) -> Response[bytes]:
    hub = hub_of(request)
    try:
        ok = await hub.store.ping()
    except Exception:
        ok = False
    health = Health("ready" if ok else "unavailable", hub.config.node.name)
    return Response(msgspec.json.encode(health), media_type=JSON, status_code=200 if ok else 503)


async def peer_gauges(store: Store) -> list[PeerGauge]:
    health = await store.peers.peer_health()
    gauges = []
    for peer in await store.peers.peers():
        up, latency, _ = health.get(peer.node_id, (None, None, 0))
        gauges.append(PeerGauge(peer.name, up, latency))
    return gauges


async def budget_gauges(store: Store, now: float) -> list[BudgetGauge]:
    """Every active key's and tenant's budget for its current period, with its spend."""
    scoped: list[tuple[str, str, int, int]] = []  # kind, id, cap, period start
    for key in await store.keys.active_keys():
        if key.limits.budget_micros is not None:
            start = period_start(key.limits.budget_period, now)
            scoped.append(("key", key.id, key.limits.budget_micros, start))
    for tenant in await store.keys.tenants():
        if tenant.limits.budget_micros is not None:
            start = period_start(tenant.limits.budget_period, now)
            scoped.append(("tenant", tenant.id, tenant.limits.budget_micros, start))
    rows = await store.spend.spend([(f"{kind}:{id_}", start) for kind, id_, _, start in scoped])
    found = {(row.scope, row.period_start): row for row in rows}
    gauges = []
    for kind, id_, cap, start in scoped:
        row = found.get((f"{kind}:{id_}", start))
        gauges.append(
            BudgetGauge(kind, id_, cap, row.spent if row else 0, row.reserved if row else 0)
        )
    return gauges


@get("/metrics")
async def metrics(request: Request) -> Response[bytes]:
    """The counters the pipeline keeps, and gauges read from the store as scraped: peers'
    health, and budgets (bounded: `MAX_BUDGET_SERIES`)."""
    hub = hub_of(request)
    try:
        hub.metrics.set_peers(await peer_gauges(hub.store))
        hub.metrics.set_budgets(await budget_gauges(hub.store, time.time()))
    except Exception:
        # The counters are still worth a scrape when the store does not answer.
        log.exception("reading peers and budgets for /metrics failed")
    return Response(hub.metrics.render(), media_type=METRICS_TYPE)


HEALTH_ROUTES = [live, ready, metrics]
