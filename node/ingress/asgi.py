"""What every API surface's hot endpoints share: bare ASGI POST endpoints.

Reading the body under its limit, the caller (its key, a peer's signature over the body), the
watcher that cancels the work when the client goes away, and sending a complete reply or a
stream straight to the server. What the reply holds and how a stream's items become bytes is
the ingress's (`node/ingress/openai.py`); what happens in between is the pipeline's
(`node/gateway/pipeline.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, NamedTuple

from litestar import Request, asgi
from litestar.exceptions import MethodNotAllowedException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.handlers import ASGIRouteHandler
from litestar.types import ExceptionHandlersMap, HTTPResponseStartEvent, Receive, Scope, Send

from adapters.types import ChatCall
from federation.httpsig import REQUEST_ID_HEADER
from federation.transport import HOP_HEADER, OUTPUT_ELASTIC_HEADER
from node.errors import HubError, client_closed, gateway_failure
from node.gateway import pipeline
from node.gateway.auth import Principal
from node.gateway.cache import CacheSlot
from node.gateway.pipeline import Admitted, Caller
from node.hub import hub_of
from node.ingress.client_gone import CLIENT_GONE, ClientGone
from node.ingress.edge import HOT
from node.ingress.headers import headers_of
from node.observe import access
from node.peers.auth import check_peer

log = logging.getLogger("aihub.gateway")

JSON = "application/json"
# On an answer the budget left capped (a request without max_tokens): the output tokens per
# choice it was allowed (`pipeline.begin_chat`).
OUTPUT_CAP_HEADER = "aihub-output-capped"


class Reply(NamedTuple):
    """A complete answer: sent as it is, with its headers."""

    body: bytes
    headers: dict[str, str]


class StreamReply(NamedTuple):
    """An answer streamed as server-sent events: each item rendered to bytes as it comes."""

    items: AsyncGenerator[Any, None]
    headers: dict[str, str]
    render: Callable[[Any], bytes]
    # Settles the request if `items` never started (a generator closed before its first
    # step runs none of its code, its `finally` included).
    abandon: Callable[[], Awaitable[None]] | None = None


def client_ip(request: Request) -> str | None:
    # The scope's own pair: `request.client` builds an `Address` on every call.
    client = request.scope.get("client")
    return client[0] if client else None


async def authenticate(request: Request) -> Principal:
    return await hub_of(request).keys.authenticate(
        headers_of(request).get("authorization"), client_ip(request)
    )


async def read_body(request: Request, principal: Principal) -> bytes:
    """The body, once its sender is known to be who the key says: a cross-node key counts only
    with a signature over this very body by the peer it was issued to."""
    hub = hub_of(request)
    body = await receive_body(request, hub.config.server.max_body_bytes)
    await check_peer(hub, request, body, principal)
    return body


async def receive_body(request: Request, limit: int) -> bytes:
    """The request's body, refused with a 413 past `limit` bytes (announced or received)."""
    announced = headers_of(request).get("content-length", "")
    if announced.isdigit() and int(announced) > limit:
        raise RequestEntityTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise client_closed()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestEntityTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def local_only(request: Request, principal: Principal) -> bool:
    """A peer's request (or one a node passed on) is served from this node's own deployments:
    never passed on to another peer (no loops, no reselling)."""
    return principal.key.peer_id is not None or HOP_HEADER in headers_of(request)


def caller_of(request: Request, principal: Principal) -> Caller:
    """The pipeline's caller, once its key and (for a peer) its signature checked out."""
    headers = headers_of(request)
    peer_request_id = headers.get(REQUEST_ID_HEADER, "")
    access.note(request.scope, key_id=principal.key_id)
    traceparent = headers.get("traceparent", "")[:128] if hub_of(request).tracing else ""
    elastic = principal.key.peer_id is not None and headers.get(OUTPUT_ELASTIC_HEADER) == "1"
    return Caller(
        principal,
        client_ip(request),
        local_only(request, principal),
        peer_request_id,
        traceparent,
        elastic,
    )


async def begin_chat(
    request: Request, principal: Principal, call: ChatCall, cache: CacheSlot | None = None
) -> Admitted:
    """The pipeline's admission of a chat call, however its surface spelled it (chat
    completions, Responses, Messages): the same model, kind and worst case for all of them
    (and the same output cap when the budget left is less than that); with its response
    cache slot, a hit that costs nothing needs no budget."""
    access.note(request.scope, model=call.request.model)
    caller = caller_of(request, principal)
    return await pipeline.begin_chat(hub_of(request), caller, call, cache)


class ClientWatch:
    """`async with cancelled_on_disconnect(receive, scope)`: run the block in this very task,
    cancelled if the client disconnects first (then a client-closed HubError comes out of
    it). No hand-off of the work to a task of its own: on a busy core each task switch is
    latency before the first byte. The server's own word that the client went
    (`node/ingress/client_gone.py`) where it gives one, else one watcher task per block. A
    class, not an `asynccontextmanager`: the generator, its wrapper and their calls cost more
    than the watch, twice a request."""

    __slots__ = ("_receive", "_scope", "_stop", "gone", "running", "task")

    def __init__(self, receive: Receive, scope: Scope) -> None:
        self._receive = receive
        self._scope = scope
        self.running = False
        self.gone = False

    def cancel(self) -> None:
        if self.running:  # else the block is done: nothing left to cancel
            self.gone = True
            self.task.cancel()

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.running = True
        gone: ClientGone | None = self._scope.get(CLIENT_GONE)  # type: ignore[call-overload]
        self._stop = gone.watch(self.cancel) if gone is not None else _watcher_task(self)

    async def __aexit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        self.running = False
        self._stop()
        if kind is not None and issubclass(kind, asyncio.CancelledError) and self.gone:
            self.task.uncancel()
            raise client_closed() from None
        return False


def cancelled_on_disconnect(receive: Receive, scope: Scope) -> ClientWatch:
    return ClientWatch(receive, scope)


def _watcher_task(watch: ClientWatch) -> Callable[[], Any]:
    receive = watch._receive

    async def wait() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        watch.cancel()

    return asyncio.ensure_future(wait()).cancel


def watcher_of(request: Request) -> Callable[[], contextlib.AbstractAsyncContextManager[None]]:
    """The pipeline's watcher of this request's client."""
    return lambda: cancelled_on_disconnect(request.receive, request.scope)


def post_endpoint(
    path: str,
    answer: Callable[[Request], Awaitable[Reply | StreamReply]],
    *,
    exception_handlers: ExceptionHandlersMap | None = None,
) -> ASGIRouteHandler:
    """A hot endpoint as a bare ASGI handler: the app's edge hands it its POSTs and turns
    whatever it raises into a shaped error (the app's exception handlers, or the route's own
    `exception_handlers` for a surface whose errors have another shape); Litestar routes
    anything else to it. The answer is sent straight to the server, without building a
    Litestar response (its resolution and encoding of a response cost about as much CPU per
    request as the rest of Litestar's work)."""

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        request: Request = Request(scope, receive, send)
        if request.method != "POST":
            raise MethodNotAllowedException(headers={"allow": "POST"})
        reply = await answer(request)
        if isinstance(reply, Reply):
            await _send_reply(send, reply)
        else:
            await _send_stream(scope, receive, send, reply)

    handler = asgi(
        path,
        copy_scope=False,
        name=answer.__name__,
        exception_handlers=exception_handlers,
        opt={HOT: True},  # a POST to it skips Litestar's router (node/ingress/edge.py)
    )
    return handler(endpoint)


def _start(headers: dict[str, str], media_type: str) -> HTTPResponseStartEvent:
    raw = [(b"content-type", media_type.encode())]
    raw += [(name.encode(), value.encode("latin-1")) for name, value in headers.items()]
    return {"type": "http.response.start", "status": 200, "headers": raw}


async def _send_reply(send: Send, reply: Reply) -> None:
    start = _start(reply.headers, JSON)
    start["headers"].append((b"content-length", str(len(reply.body)).encode()))
    await send(start)
    await send({"type": "http.response.body", "body": reply.body, "more_body": False})


async def _send_stream(scope: Scope, receive: Receive, send: Send, reply: StreamReply) -> None:
    """Send the items as they come; a client that goes away cancels the stream (its relay
    then settles the request as closed by the client). A failure before the first byte is
    answered as a gateway failure (a shaped 502)."""
    started = False
    render = reply.render
    try:
        async with cancelled_on_disconnect(receive, scope):
            start = _start(reply.headers, "text/event-stream")
            await send(start)
            started = True
            async for item in reply.items:
                await send({"type": "http.response.body", "body": render(item), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    except HubError:
        pass  # the client went away: there is no one to tell
    except Exception as exc:
        if started:
            raise
        log.exception("stream failed in the gateway before its first byte")
        raise gateway_failure(exc) from None
    finally:
        await reply.items.aclose()  # settles a relay cut short while it waited to be sent
        if reply.abandon is not None:
            await reply.abandon()
