"""The Litestar app factory."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from litestar import Litestar

from node.admin.ledger import LEDGER_ROUTES
from node.admin.logs import LOG_ROUTES
from node.admin.peers import PEER_ROUTES
from node.admin.routes import ADMIN_ROUTES
from node.admin.stats import STATS_ROUTES
from node.collector import settle_collector
from node.config import data_dir, load_config
from node.hub import Hub
from node.ingress import anthropic
from node.ingress.edge import Edge
from node.ingress.errors import EXCEPTION_HANDLERS
from node.ingress.moderations import ROUTES as MODERATION_ROUTES
from node.ingress.openai import ROUTES, document
from node.ingress.openai_more import ROUTES as OPENAI_MORE_ROUTES
from node.ingress.responses import ROUTES as RESPONSES_ROUTES
from node.observe.health import HEALTH_ROUTES
from node.observe.openapi import ASSETS_ROUTER, document_api, openapi_config
from node.peers.routes import FEDERATION_ROUTES
from node.ui.routes import UI_ROUTES


def create_served_app() -> Litestar:
    """What `aihub serve` runs in each worker process: the app, with the garbage collector
    settled once the node has started (node/collector.py). An app built for a test in the
    test's own process is not: freezing there would keep every earlier test's objects."""
    return create_app(serving=True)


def create_app(directory: Path | None = None, *, serving: bool = False) -> Litestar:
    """Build the app for the node in `directory` (default: `$AIHUB_HOME`, else ~/.aihub)."""
    folder = directory or data_dir(os.environ.get("AIHUB_HOME"))
    config = load_config(folder)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        app.state.hub = await Hub.start(folder, config)
        if serving:
            # What startup made lives as long as the process: out of the collector's walks.
            settle_collector()
        try:
            yield
        finally:
            await app.state.hub.stop()

    app = Litestar(
        route_handlers=[
            *ROUTES,
            *anthropic.ROUTES,
            *RESPONSES_ROUTES,
            *OPENAI_MORE_ROUTES,
            *MODERATION_ROUTES,
            *ADMIN_ROUTES,
            *LOG_ROUTES,
            *LEDGER_ROUTES,
            *FEDERATION_ROUTES,
            # The dashboard (issue 16): its pages, and the admin endpoints it reads; health,
            # metrics and the API docs' assets.
            *PEER_ROUTES,
            *STATS_ROUTES,
            *UI_ROUTES,
            *HEALTH_ROUTES,
            ASSETS_ROUTER,
        ],
        lifespan=[lifespan],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        request_max_body_size=config.server.max_body_bytes,
        openapi_config=openapi_config(),
        debug=False,
        logging_config=None,  # logging is the server's and the CLI's to configure
    )
    document(app.openapi_schema)
    anthropic.document(app.openapi_schema)
    document_api(app.openapi_schema)
    # Outermost, so that it sees every answer (404s and errors too): it stamps each with its
    # request id, logs it, and hands the hot endpoints their requests (node/ingress/edge.py).
    app.asgi_handler = Edge(app)
    return app
