"""The app's edge: the one ASGI callable between the server and Litestar's own handler.

Every HTTP request passes here once, and everything every answer needs is done here in one
wrapper of `send`: the answer's head gets its `aihub-request-id` (a handler's own, else a
fresh one) and, under `/ui` and `/schema`, the browser's security headers
(`node/ui/security.py`); the access line is written when the answer is done
(`node/observe/access.py`).

A POST to a hot endpoint (the `post_endpoint`s of `node/ingress/asgi.py`: chat completions,
Responses, Messages, ...) is handed to its endpoint here, with its route's exception handlers,
without Litestar's exception middleware, router and route in between: those three wrappers,
the two `before_send` hooks and the access log's own `send` wrapper cost ~50 µs of CPU a request
at 1,000 requests a second (py-spy, pinned), more than authentication. Anything that is not
plainly such a request (another method, a path Litestar would normalise, a `root_path`, a Host
header Litestar refuses) goes to Litestar as before, which answers it as it always did.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

from litestar import Litestar, Request
from litestar._asgi.utils import is_valid_host
from litestar.handlers import ASGIRouteHandler
from litestar.middleware._internal.exceptions.middleware import get_exception_handler
from litestar.routes import ASGIRoute
from litestar.types import ASGIApp, Message, Receive, Scope, Send, TypeEncodersMap

from federation.httpsig import REQUEST_ID_HEADER
from federation.ids import new_request_id
from node.hub import HUB_KEY
from node.observe.access import ACCESS_LOGGER, AccessLog, Answer
from node.ui.security import with_security_headers

# Marks a route handler whose requests the edge may hand straight to its endpoint.
HOT = "aihub.hot"
_REQUEST_ID = REQUEST_ID_HEADER.encode()


class HotRoute(NamedTuple):
    handler: ASGIRouteHandler
    exception_handlers: Mapping[Any, Any]
    type_encoders: TypeEncodersMap | None


def hot_routes(app: Litestar) -> dict[str, HotRoute]:
    """The hot endpoints by path: marked ASGI routes with no path parameters, guards or
    middleware of their own (which Litestar's route would run), and whose exception
    handlers answer every exception (so that nothing here needs Litestar's default)."""
    table: dict[str, HotRoute] = {}
    for route in app.routes:
        if not isinstance(route, ASGIRoute) or route.path_parameters:
            continue
        handler = route.route_handler
        if not handler.opt.get(HOT) or handler.resolve_guards() or handler.resolve_middleware():
            continue
        handlers = handler.resolve_exception_handlers()
        if Exception not in handlers:
            continue
        table[route.path] = HotRoute(handler, handlers, handler.resolve_type_encoders())
    return table


def stamp(headers: list[tuple[bytes, bytes]], answer: Answer) -> list[tuple[bytes, bytes]]:
    """The head's `aihub-request-id`: a handler's own (the id its receipt and usage row name)
    is kept, anything else (an error, a 404, /health) gets a fresh one, so a client can always
    quote it."""
    for name, value in headers:
        if name == _REQUEST_ID:
            answer.request_id = value.decode("latin-1")[:64]
            return headers
    fresh = new_request_id()
    answer.request_id = fresh
    return [*headers, (_REQUEST_ID, fresh.encode())]


def plain_host(scope: Scope) -> bool:
    """Whether Litestar's router would let the Host header through (its own check: anything
    else goes to Litestar, which refuses it as it does on every other path)."""
    for name, value in scope["headers"]:
        if name == b"host":
            return is_valid_host(value)
    return True


class Edge:
    """Installed as the app's `asgi_handler` (inside `Litestar.__call__`, which puts the app
    in the scope): see the module's docstring."""

    def __init__(self, app: Litestar, logger: logging.Logger | None = None) -> None:
        self.inner: ASGIApp = app.asgi_handler
        self.state = app.state
        self.hot = hot_routes(app)
        self.access = AccessLog(logger or logging.getLogger(ACCESS_LOGGER))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        started = time.perf_counter()
        answer = Answer()
        scope[HUB_KEY] = self.state.get("hub")  # type: ignore[typeddict-unknown-key]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer.status = message["status"]
                headers = stamp(list(message.get("headers", ())), answer)
                # The path as routed: Litestar's router normalises it (`//ui` is `/ui`).
                message["headers"] = with_security_headers(scope["path"], headers)
            await send(message)

        try:
            route = self._hot(scope, scope["path"])
            if route is None:
                await self.inner(scope, receive, sending)
            else:
                await self._serve(route, scope, receive, sending, answer)
        finally:
            if self.access.enabled():
                self.access.write(scope, answer, (time.perf_counter() - started) * 1000)

    def _hot(self, scope: Scope, path: str) -> HotRoute | None:
        if scope["method"] != "POST" or scope.get("root_path"):
            return None
        route = self.hot.get(path)
        if route is None or not plain_host(scope):
            return None
        return route

    @staticmethod
    async def _serve(
        route: HotRoute, scope: Scope, receive: Receive, send: Send, answer: Answer
    ) -> None:
        """The endpoint, and what Litestar's exception middleware does if it raises before
        its answer began: the route's handler's shaped response. After the answer began there
        is nothing to shape: the server closes the connection, as it does under Litestar."""
        scope["route_handler"] = route.handler  # as Litestar's router leaves it
        scope.setdefault("path_params", {})
        try:
            await route.handler.fn(scope, receive, send)
        except Exception as exc:
            if answer.status:
                raise
            request: Request = Request(scope, receive, send)
            # Litestar's own choice of handler; `hot_routes` made sure there is one.
            handler = get_exception_handler(route.exception_handlers, exc)
            assert handler is not None
            response = handler(request, exc)
            asgi_response = response.to_asgi_response(
                app=None, request=request, type_encoders=route.type_encoders
            )
            await asgi_response(scope, receive, send)
