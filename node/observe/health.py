"""Liveness, readiness and the Prometheus metrics: what a load balancer and a scraper ask."""

from __future__ import annotations

import msgspec
from litestar import Request, Response, get

from node import __version__
from node.hub import hub_of

JSON = "application/json"
# Prometheus' text format, version 0.0.4 (what `prometheus_client` renders).
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Health(msgspec.Struct):
    status: str
    node: str | None = None
    version: str = __version__


@get("/health/live")
async def live() -> Response[bytes]:
    return Response(msgspec.json.encode(Health("ok")), media_type=JSON)


@get("/health/ready")
async def ready(request: Request) -> Response[bytes]:
    hub = hub_of(request)
    try:
        ok = await hub.store.ping()
    except Exception:
        ok = False
    health = Health("ready" if ok else "unavailable", hub.config.node.name)
    return Response(msgspec.json.encode(health), media_type=JSON, status_code=200 if ok else 503)


@get("/metrics")
async def metrics(request: Request) -> Response[bytes]:
    body = hub_of(request).metrics.render()
    return Response(body, media_type=METRICS_TYPE)


HEALTH_ROUTES = [live, ready, metrics]
