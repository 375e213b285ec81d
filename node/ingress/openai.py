"""The OpenAI-compatible endpoints: chat completions, embeddings and the model list.

One request, one pass: authenticate from memory, validate with msgspec, let the router pick a
deployment, answer, then queue one usage record. Streams fall back to another deployment only
before their first byte has reached the client; a client that goes away cancels the upstream
call (a peer's plain request runs to its end instead, for its receipt: see `_route`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple, NoReturn, TypeVar

import anyio
import msgspec
from litestar import Request, Response, asgi, get
from litestar.exceptions import MethodNotAllowedException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.handlers import ASGIRouteHandler
from litestar.openapi.spec import (
    OpenAPI,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    PathItem,
    RequestBody,
    Schema,
)
from litestar.params import FromPath
from litestar.types import HTTPResponseStartEvent, Receive, Scope, Send

from adapters.tokens import estimate_prompt_tokens
from adapters.types import (
    ChatCall,
    ChatRequest,
    ChatResult,
    ChatStream,
    EmbedCall,
    EmbeddingRequest,
    EmbedResult,
    UpstreamError,
    Usage,
    sse_event,
)
from federation.httpsig import REQUEST_ID_HEADER
from federation.ids import new_request_id
from federation.transport import HOP_HEADER, RECEIPT_EVENT, RECEIPT_HEADER
from ledger.canonical import b64url
from ledger.nesting import bounded
from ledger.receipts import SentRequest
from node.gateway.auth import Principal
from node.gateway.budgets import budget_scopes
from node.gateway.policy import model_allowed, worst_case_embedding_tokens, worst_case_prompt_tokens
from node.gateway.ratelimit import Admission, RateLimited, ScopeLimits
from node.gateway.router import NoRoute, Route
from node.gateway.usage import clamp_usage, cost_micros
from node.hub import Hub, hub_of
from node.ingress.errors import ApiError, ErrorDetail, error_bytes
from node.peers.auth import check_peer
from node.storage.records import Charge, Hold, UsageRecord, now_ms

T = TypeVar("T")
log = logging.getLogger("aihub.gateway")
# A request id a peer sends us, to name its receipt by.
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

JSON = "application/json"
DONE = b"data: [DONE]\n\n"
CLIENT_CLOSED = 499  # nginx's status for a client that went away first

_raw_fields = msgspec.json.Decoder(dict[str, msgspec.Raw])
_chat_decoder = msgspec.json.Decoder(ChatRequest)
_embed_decoder = msgspec.json.Decoder(EmbeddingRequest)


class ModelCard(msgspec.Struct, tag_field="object", tag="model"):
    id: str
    owned_by: str
    created: int


class ModelList(msgspec.Struct, tag_field="object", tag="list"):
    data: list[ModelCard]


def _param(message: str) -> tuple[str, str | None]:
    """msgspec's `… - at `$.messages[0].role`` -> ("…", "messages[0].role")."""
    match = re.search(r" - at `\$\.?([^`]*)`$", message)
    if not match:
        return message, None
    return message[: match.start()], match.group(1) or None


def decode_body(body: bytes, decoder: msgspec.json.Decoder[T]) -> tuple[T, dict[str, Any]]:
    if not body:
        raise ApiError(400, "The request body is empty: send a JSON object")
    try:
        typed = decoder.decode(bounded(body))
        raw = _raw_fields.decode(body)
    except msgspec.ValidationError as exc:
        message, param = _param(str(exc))
        raise ApiError(400, f"Invalid request: {message}", param=param) from exc
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}") from exc
    return typed, raw


def _plan(hub: Hub, principal: Principal, model: str, kind: str, local_only: bool) -> list[Route]:
    try:
        return hub.router.plan(
            model, kind, local_only=local_only, allowed=lambda name: _may_use(principal, name)
        )
    except NoRoute:
        other = "embeddings" if kind == "chat" else "chat"
        served = hub.router.serves(model, other, local_only=local_only)
        if served:
            message = f"The model `{model}` does not serve {kind}"
            raise ApiError(400, message, param="model", code="model_not_supported") from None
        message = f"The model `{model}` does not exist on this node"
        raise ApiError(404, message, param="model", code="model_not_found") from None


@contextlib.asynccontextmanager
async def _cancelled_on_disconnect(receive: Receive) -> AsyncIterator[None]:
    """Run the block in this very task, cancelled if the client disconnects first (then an
    ApiError 499 comes out of it). One watcher task per request, and no hand-off of the work
    to a task of its own: on a busy core each task switch is latency before the first byte."""
    task = asyncio.current_task()
    assert task is not None
    state = {"running": True, "gone": False}

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if state["running"]:  # else the block is done: nothing left to cancel
            state["gone"] = True
            task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        yield
    except asyncio.CancelledError:
        if not state["gone"]:
            raise
        task.uncancel()
        raise ApiError(CLIENT_CLOSED, "Client closed the request", code="client_closed") from None
    finally:
        state["running"] = False
        watcher.cancel()


def _gateway_error(exc: BaseException) -> ApiError:
    """What a client is told of a failure nothing expected (a bug, or an upstream that broke
    something no parser covers): an OpenAI-shaped 502, without the traceback (it is logged)."""
    return ApiError(
        502,
        f"The gateway could not complete the request ({type(exc).__name__})",
        type="upstream_error",
        code="gateway_error",
    )


@contextlib.asynccontextmanager
async def _settled_on_error(books: Accounting) -> AsyncIterator[None]:
    """Whatever escapes the block while the request holds reservations and parallel slots,
    they are released (the request is settled as failed) and the client gets a shaped 502,
    never a 500 that strands its budget until a restart. Settling is once: a request that
    was settled already is only answered."""
    try:
        yield
    except ApiError:
        raise  # shaped, and settled by `Accounting.fail`
    except Exception as exc:
        log.exception("request %s failed in the gateway", books.request_id)
        books.fail(_gateway_error(exc))


class Accounting:
    """One request's books: what it holds (rate-limit slots, budget reservations), what it
    finally costs, and the one usage record that settles it, however the request ends."""

    def __init__(
        self, hub: Hub, principal: Principal, request_id: str, model: str, endpoint: str
    ) -> None:
        self.hub = hub
        self.principal = principal
        self.request_id = request_id
        self.model = model
        self.endpoint = endpoint
        self.started = time.perf_counter()
        self.admission: Admission | None = None
        self.holds: list[Hold] = []
        self.headers: dict[str, str] = {"aihub-request-id": request_id}
        self._settled = False
        # A peer's request is settled together with the receipt we sign for it.
        self.for_peer = principal.key.peer_id is not None
        self._for_receipt: Charge | None = None
        self.receipt_id = request_id
        # The worst case admitted, and what was reserved for it: the bounds of what the
        # request may be said to have used, and charged.
        self.worst = Usage()
        self.reserved = 0

    async def admit(self, request: Request, plan: list[Route], worst: Usage) -> None:
        """Rate limits, then the worst-case cost reserved against every budget on the path."""
        principal, hub = self.principal, self.hub
        ip = client_ip(request)
        try:
            self.admission = await hub.limiter.admit(rate_scopes(principal))
        except RateLimited as exc:
            hub.keys.note("limit.rate", principal.key_id, ip, {"reason": exc.message})
            headers = {**exc.headers, "retry-after": str(max(1, math.ceil(exc.retry_after)))}
            self.fail(
                ApiError(
                    429,
                    exc.message,
                    type="rate_limit_error",
                    code="rate_limit_exceeded",
                    headers=headers,
                )
            )
        self.headers.update(self.admission.headers)
        price_in = max(route.spec.price_in for route in plan)
        price_out = max(route.spec.price_out for route in plan)
        self.worst = worst
        self.reserved = cost_micros(worst, price_in, price_out)
        try:
            self.holds = await hub.budgets.reserve(principal, self.reserved)
        except ApiError as exc:
            hub.keys.note("limit.budget", principal.key_id, ip, {"reason": exc.detail.message})
            hub.alerts.exhausted(
                [(s, start) for s, start, _ in hub.budgets.periods(principal, time.time())]
            )
            self.fail(exc)

    @property
    def settled(self) -> bool:
        return self._settled

    def upstream_failed(self, route: Route, exc: UpstreamError) -> None:
        status = str(exc.upstream_status or 0)
        self.hub.metrics.upstream_errors.labels(route.label, status).inc()

    def finish(
        self,
        route: Route | None,
        usage: Usage,
        *,
        estimated: bool,
        status: int,
        stream: bool,
        error: str | None = None,
    ) -> int:
        """Settle the request (once): cost, usage record, reservations, limits, metrics. The
        counts are clamped to what the request could have used, and the charge to what was
        reserved for it: a budget never passes its cap, whatever the upstream reports; the
        record keeps what it cost beyond the charge (`unbilled_micros`). The charge."""
        if self._settled:
            return 0
        self._settled = True
        usage, clamped = clamp_usage(usage, self.worst)
        spec = route.spec if route else None
        actual = 0
        if spec is not None:
            # A peer pays the price we advertised it (the cheapest deployment of the name),
            # whichever deployment served: it agreed to that, and its books check it.
            price_in, price_out = (
                self.hub.peering.advertised_price(spec.name)
                if self.for_peer
                else (spec.price_in, spec.price_out)
            )
            actual = cost_micros(usage, price_in, price_out)
        cost = min(actual, self.reserved)
        elapsed = time.perf_counter() - self.started
        record = UsageRecord(
            request_id=self.request_id,
            ts_ms=now_ms(),
            key_id=self.principal.key_id,
            tenant_id=self.principal.key.tenant_id,
            model=self.model,
            deployment=route.label if route else None,
            provider=spec.provider if spec else None,
            endpoint=self.endpoint,
            stream=stream,
            tokens_in=usage.prompt_tokens,
            tokens_out=usage.completion_tokens,
            estimated=estimated,
            cost_micros=cost,
            latency_ms=round(elapsed * 1000),
            status=status,
            error=error,
            unbilled_micros=actual - cost,
            clamped=clamped,
        )
        charge = Charge(
            record, self.hub.budgets.settle(self.holds, cost), _sent(self.request_id, route, status)
        )
        if self.for_peer and route is not None and (status == 200 or usage.total_tokens):
            # Whatever was produced for a peer is receipted, whether or not the peer stayed
            # to the end of the answer (`issue_receipt`).
            self._for_receipt = charge
        else:
            self.hub.usage.record(charge)
        if self.admission is not None:
            self.hub.limiter.release(self.admission, usage.total_tokens)
        self.hub.metrics.settled(
            self.endpoint, self.model, status, usage.prompt_tokens, usage.completion_tokens, cost
        )
        if clamped or actual != cost:
            self.hub.metrics.untrusted(self.model, clamped, actual - cost)
        return cost

    async def issue_receipt(self) -> bytes | None:
        """For a peer's request that was answered: write its usage record, spend and our
        signed receipt together, before the answer completes; the receipt."""
        charge, self._for_receipt = self._for_receipt, None
        if charge is None:
            return None
        peer_id = self.principal.key.peer_id or ""
        try:
            receipt = await self.hub.receipts.issue(
                charge, peer_id, self.receipt_id, self.principal.key_id
            )
        except Exception:
            # The answer is already paid for upstream: keep its usage record even so.
            log.exception("could not issue a receipt to %s", peer_id)
            self.hub.usage.record(charge)
            return None
        self.hub.usage.written([charge])
        return receipt

    def take_receipt(self, route: Route, receipt: bytes | None, cost: int) -> None:
        """The receipt of the peer that served us, kept and countersigned off the path if it
        is for this very request, as we asked and priced it."""
        sent = _sent(self.request_id, route, 200)
        if sent is not None and receipt is not None:
            self.hub.receipts.take(sent, receipt, cost)

    def observe_latency(self) -> None:
        elapsed = time.perf_counter() - self.started
        self.hub.metrics.answered(self.endpoint, self.model, elapsed)

    def fail(self, exc: ApiError) -> NoReturn:
        """Settle a request that got no answer (nothing is charged) and raise its error."""
        self.finish(
            None,
            Usage(),
            estimated=False,
            status=exc.status,
            stream=False,
            error=exc.detail.message[:500],
        )
        raise exc


def _sent(request_id: str, route: Route | None, status: int) -> SentRequest | None:
    """For a request routed to a peer, the durable record of what we asked it (journaled
    with the usage record): the only request its receipt may bill."""
    if route is None or route.peer_id is None:
        return None
    spec = route.spec
    return SentRequest(
        request_id, route.peer_id, spec.name, route.price_seq, spec.price_in, spec.price_out, status
    )


def client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


def rate_scopes(principal: Principal) -> list[ScopeLimits]:
    return [
        ScopeLimits(scope, limits.rpm, limits.tpm, limits.max_parallel)
        for scope, limits in budget_scopes(principal)
        if limits.rpm or limits.tpm or limits.max_parallel
    ]


def _may_use(principal: Principal, model: str) -> bool:
    """Whether the key's (and its tenant's) allowlist lets it use `model`."""
    name = model.partition("@")[0]  # `llama3@alice` is llama3, from one peer
    allowed = model_allowed(principal.key.limits.models, name)
    if allowed and principal.tenant is not None:
        allowed = model_allowed(principal.tenant.limits.models, name)
    return allowed


def _check_model(principal: Principal, model: str) -> None:
    if not _may_use(principal, model):
        raise ApiError(
            403,
            f"This key may not use the model `{model}`",
            type="permission_error",
            code="model_not_allowed",
            param="model",
        )


async def _authenticate(request: Request) -> Principal:
    return await hub_of(request).keys.authenticate(
        request.headers.get("authorization"), client_ip(request)
    )


async def _read_body(request: Request, principal: Principal) -> bytes:
    """The body, once its sender is known to be who the key says: a cross-node key counts only
    with a signature over this very body by the peer it was issued to."""
    hub = hub_of(request)
    body = await _receive_body(request, hub.config.server.max_body_bytes)
    await check_peer(hub, request, body, principal)
    return body


async def _receive_body(request: Request, limit: int) -> bytes:
    """The request's body, refused with a 413 past `limit` bytes (announced or received)."""
    announced = request.headers.get("content-length", "")
    if announced.isdigit() and int(announced) > limit:
        raise RequestEntityTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ApiError(CLIENT_CLOSED, "Client closed the request", code="client_closed")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestEntityTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _local_only(request: Request, principal: Principal) -> bool:
    """A peer's request is served from this node's own deployments: never passed on to
    another peer (no loops, no reselling)."""
    return principal.key.peer_id is not None or HOP_HEADER in request.headers


async def _begin(
    request: Request,
    principal: Principal,
    model: str,
    kind: str,
    request_id: str,
    worst: Callable[[list[Route]], Usage],
) -> tuple[Accounting, list[Route]]:
    """Everything between the key and the upstream call: which model, which routes, and is
    the request admitted under its limits and budgets?"""
    hub = hub_of(request)
    _check_model(principal, model)
    plan = _plan(hub, principal, model, kind, _local_only(request, principal))
    books = Accounting(hub, principal, request_id, model, kind)
    peer_request_id = request.headers.get(REQUEST_ID_HEADER, "")
    if books.for_peer and _REQUEST_ID.fullmatch(peer_request_id):
        books.receipt_id = peer_request_id
    if books.for_peer and not hub.resync.synced(principal.key.peer_id or ""):
        try:  # before anything is spent: no receipt from a chain head the peer may be past
            await hub.resync.ensure(principal.key.peer_id or "")
        except ApiError as exc:
            books.fail(exc)
    async with _settled_on_error(books):
        await books.admit(request, plan, worst(plan))
    return books, plan


async def _route(
    request: Request,
    books: Accounting,
    plan: list[Route],
    attempt: Callable[[Route], Awaitable[T]],
) -> tuple[T, Route]:
    """Run `attempt` along the plan; a failure is recorded and answered OpenAI's way. A
    client that goes away cancels the call; a peer's does not: the provider pays its upstream
    for the answer either way, so the answer runs to its end and gets its receipt (the peer's
    cap is charged for it) whether or not the peer is still there to read it."""
    watch = _cancelled_on_disconnect(request.receive)
    try:
        async with contextlib.nullcontext() if books.for_peer else watch:
            return await books.hub.router.run(plan, attempt, books.upstream_failed)
    except UpstreamError as exc:
        async with _settled_on_error(books):
            error = ApiError.from_upstream(exc)
        books.fail(error)
    except ApiError as exc:
        books.fail(exc)
    except Exception as exc:
        log.exception("request %s failed in the gateway", books.request_id)
        books.fail(_gateway_error(exc))
    except BaseException:
        books.finish(
            None, Usage(), estimated=False, status=CLIENT_CLOSED, stream=False, error="cancelled"
        )
        raise


def _chat_worst_case(chat: ChatRequest, plan: list[Route]) -> Usage:
    prompt = worst_case_prompt_tokens(
        chat, lambda: [(r.adapter.upstream.provider, r.adapter.upstream.model) for r in plan]
    )
    ceiling = max(route.spec.max_output_tokens for route in plan)
    output = min(chat.output_limit or ceiling, ceiling) * (chat.n or 1)
    return Usage(prompt, output, prompt + output)


class Reply(NamedTuple):
    """A complete answer: sent as it is, with its headers."""

    body: bytes
    headers: dict[str, str]


class StreamReply(NamedTuple):
    """An answer streamed as server-sent events."""

    events: AsyncGenerator[bytes, None]
    headers: dict[str, str]
    # Settles the request if `events` never started (a generator closed before its first
    # step runs none of its code, its `finally` included).
    abandon: Callable[[], Awaitable[None]] | None = None


def _post_endpoint(
    path: str, answer: Callable[[Request], Awaitable[Reply | StreamReply]]
) -> ASGIRouteHandler:
    """A hot endpoint as a bare ASGI handler: Litestar still routes the request and turns
    whatever it raises into an OpenAI-shaped error, but the answer is sent straight to the
    server, without building a Litestar response (its resolution and encoding of a response
    cost about as much CPU per request as the rest of Litestar's work)."""

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        request: Request = Request(scope, receive, send)
        if request.method != "POST":
            raise MethodNotAllowedException(headers={"allow": "POST"})
        reply = await answer(request)
        if isinstance(reply, Reply):
            await _send_reply(send, reply)
        else:
            await _send_stream(send, receive, reply)

    return asgi(path, copy_scope=False, name=answer.__name__)(endpoint)


def _start(headers: dict[str, str], media_type: str) -> HTTPResponseStartEvent:
    raw = [(b"content-type", media_type.encode())]
    raw += [(name.encode(), value.encode("latin-1")) for name, value in headers.items()]
    return {"type": "http.response.start", "status": 200, "headers": raw}


async def _send_reply(send: Send, reply: Reply) -> None:
    start = _start(reply.headers, JSON)
    start["headers"].append((b"content-length", str(len(reply.body)).encode()))
    await send(start)
    await send({"type": "http.response.body", "body": reply.body, "more_body": False})


async def _send_stream(send: Send, receive: Receive, reply: StreamReply) -> None:
    """Send the events as they come; a client that goes away cancels the stream (its relay
    then settles the request as closed by the client)."""
    started = False
    try:
        async with _cancelled_on_disconnect(receive):
            start = _start(reply.headers, "text/event-stream")
            await send(start)
            started = True
            async for event in reply.events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    except ApiError:
        pass  # the client went away: there is no one to tell
    except Exception as exc:
        if started:
            raise
        log.exception("stream failed in the gateway before its first byte")
        raise _gateway_error(exc) from None  # answered as a shaped 502
    finally:
        await reply.events.aclose()  # settles a relay cut short while it waited to be sent
        if reply.abandon is not None:
            await reply.abandon()


async def _chat(request: Request) -> Reply | StreamReply:
    principal = await _authenticate(request)  # a bad key is told so before a bad body
    chat, raw = decode_body(await _read_body(request, principal), _chat_decoder)
    call = ChatCall(chat, raw, new_request_id())
    books, plan = await _begin(
        request,
        principal,
        chat.model,
        "chat",
        call.request_id,
        lambda plan: _chat_worst_case(chat, plan),
    )
    async with _settled_on_error(books):
        if chat.stream:
            return await _stream_chat(request, call, plan, books)
        result, route = await _route(request, books, plan, lambda r: r.adapter.chat(call))
        return await _answer(books, route, result)


async def _answer(books: Accounting, route: Route, result: ChatResult | EmbedResult) -> Reply:
    """Settle a complete answer: with our receipt if a peer asked, keeping the receipt of the
    peer that served it if we asked one."""
    books.observe_latency()
    cost = books.finish(
        route, result.usage, estimated=result.usage_estimated, status=200, stream=False
    )
    headers = {**books.headers, "aihub-cost-micros": str(cost)}
    receipt = await books.issue_receipt()
    if receipt is not None:
        headers[RECEIPT_HEADER] = b64url(receipt)
    books.take_receipt(route, result.receipt, cost)
    return Reply(result.body, headers)


class _Opened(msgspec.Struct):
    stream: ChatStream
    events: AsyncIterator[bytes]
    first: bytes | None


async def _open(route: Route, call: ChatCall) -> _Opened:
    """Open a stream and read its first event, so that a failure before the first byte can
    still fall back to the next deployment."""
    stream = await route.adapter.open_stream(call)
    events = aiter(stream)
    try:
        first = await anext(events, None)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await stream.aclose()
        raise
    return _Opened(stream, events, first)


async def _stream_chat(
    request: Request, call: ChatCall, plan: list[Route], books: Accounting
) -> StreamReply:
    opened, route = await _route(request, books, plan, lambda r: _open(r, call))
    books.observe_latency()
    return StreamReply(
        _relay(opened, route, call, books),
        {**books.headers, "cache-control": "no-cache"},
        lambda: _abandon(opened, route, call, books),
    )


async def _abandon(opened: _Opened, route: Route, call: ChatCall, books: Accounting) -> None:
    """A stream whose relay never ran (it failed or was cancelled before its first event was
    asked for): settled as its relay would have settled it."""
    if not books.settled:
        await _settle_stream(opened, route, call, books, 0, CLIENT_CLOSED, "stream not sent")


async def _relay(
    opened: _Opened, route: Route, call: ChatCall, books: Accounting
) -> AsyncGenerator[bytes, None]:
    """Pass the upstream's events to the client; account for them however the stream ends."""
    stream = opened.stream
    sent = 0
    status, error = 200, None
    try:
        if opened.first is not None:
            yield opened.first
            sent += 1
        async for event in opened.events:
            yield event
            sent += 1
        if books.for_peer:
            # The receipt goes before [DONE], as an event of its own that the consumer keeps.
            usage, estimated = _stream_usage(stream, call, sent)
            books.finish(route, usage, estimated=estimated, status=200, stream=True)
            # The answer is complete: its records and receipt are written even if the peer
            # goes away meanwhile (a cancelled transaction would lose the usage record).
            with anyio.CancelScope(shield=True):
                receipt = await books.issue_receipt()
            if receipt is not None:
                yield b"event: " + RECEIPT_EVENT + b"\ndata: " + receipt + b"\n\n"
        yield DONE
    except UpstreamError as exc:
        # Too late to fall back: the client has bytes already. Tell it in OpenAI's way.
        status, error = exc.status, exc.message
        detail = ErrorDetail(exc.message, exc.type, exc.code)
        yield sse_event(error_bytes(detail))
    except Exception as exc:
        # Nothing expected it (a bug, or an upstream event no parser covers): the same.
        log.exception("stream %s failed in the gateway", books.request_id)
        failure = _gateway_error(exc)
        status, error = failure.status, failure.detail.message
        yield sse_event(error_bytes(failure.detail))
    except BaseException:
        status, error = CLIENT_CLOSED, "client closed the stream"
        raise
    finally:
        await _settle_stream(opened, route, call, books, sent, status, error)


async def _settle_stream(
    opened: _Opened,
    route: Route,
    call: ChatCall,
    books: Accounting,
    sent: int,
    status: int,
    error: str | None,
) -> None:
    """Close the upstream stream and settle what it used, however the stream ended."""
    stream = opened.stream
    with anyio.CancelScope(shield=True):
        await stream.aclose()
    usage, estimated = _stream_usage(stream, call, sent)
    cost = books.finish(route, usage, estimated=estimated, status=status, stream=True, error=error)
    if status == 200:
        books.take_receipt(route, stream.receipt, cost)
    else:
        # A peer that went away (or an upstream that failed) before the end still got
        # what was sent: its receipt is written for that, and its cap charged.
        with anyio.CancelScope(shield=True):
            await books.issue_receipt()


def _stream_usage(stream: ChatStream, call: ChatCall, sent: int) -> tuple[Usage, bool]:
    """What a stream used, as the upstream counted it, or estimated if it was cut short:
    the prompt and roughly one token per event delivered."""
    if stream.usage is not None:
        return stream.usage, stream.usage_estimated
    prompt = estimate_prompt_tokens(call.request.messages)
    return Usage(prompt, sent, prompt + sent), True


async def _embeddings(request: Request) -> Reply:
    principal = await _authenticate(request)
    embed, raw = decode_body(await _read_body(request, principal), _embed_decoder)
    call = EmbedCall(embed, raw, new_request_id())
    tokens = worst_case_embedding_tokens(embed)
    books, plan = await _begin(
        request,
        principal,
        embed.model,
        "embeddings",
        call.request_id,
        lambda _: Usage(tokens, 0, tokens),
    )
    async with _settled_on_error(books):
        result, route = await _route(request, books, plan, lambda r: r.adapter.embed(call))
        return await _answer(books, route, result)


def _cards(hub: Hub, principal: Principal, local_only: bool) -> dict[str, ModelCard]:
    """The models this client can ask for: this node's own (owned by this node), then those
    only peers serve (owned by the first peer that advertises each); only those its key's
    (and tenant's, or invite's) allowlist lets it use, as its advert shows a peer."""
    cards = {
        name: ModelCard(id=name, owned_by=hub.config.node.name, created=hub.started_at)
        for name in hub.router.by_name
        if _may_use(principal, name)
    }
    if not local_only:
        for name, routes in hub.router.peer_by_name.items():
            if not _may_use(principal, name):
                continue
            owner = routes[0].peer_name or "peer"
            cards.setdefault(name, ModelCard(id=name, owned_by=owner, created=hub.started_at))
    return cards


async def _authenticate_listing(request: Request) -> Principal:
    """A model listing's caller: a cross-node key counts only with its peer's signature, as
    on every peer endpoint (a stolen key alone must not show what the peer may use)."""
    principal = await _authenticate(request)
    await check_peer(hub_of(request), request, await request.body(), principal)
    return principal


@get("/v1/models")
async def list_models(request: Request) -> Response[bytes]:
    principal = await _authenticate_listing(request)
    cards = _cards(hub_of(request), principal, _local_only(request, principal))
    return Response(msgspec.json.encode(ModelList(list(cards.values()))), media_type=JSON)


@get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: FromPath[str]) -> Response[bytes]:
    principal = await _authenticate_listing(request)
    model = model_id.lstrip("/")
    card = _cards(hub_of(request), principal, _local_only(request, principal)).get(model)
    if card is None:
        message = f"The model `{model}` does not exist on this node"
        raise ApiError(404, message, param="model", code="model_not_found")
    return Response(msgspec.json.encode(card), media_type=JSON)


chat_completions = _post_endpoint("/v1/chat/completions", _chat)
embeddings = _post_endpoint("/v1/embeddings", _embeddings)


def document(openapi: OpenAPI) -> None:
    """Describe the two ASGI endpoints in the app's OpenAPI schema (Litestar lists only the
    routes it answers itself). Their bodies are OpenAI's: its API reference is the spec."""
    body = {JSON: OpenAPIMediaType(schema=Schema(type=OpenAPIType.OBJECT))}
    paths = dict(openapi.paths or {})
    for path, operation_id, what in (
        ("/v1/chat/completions", "createChatCompletion", "a chat completion"),
        ("/v1/embeddings", "createEmbedding", "embeddings"),
    ):
        paths[path] = PathItem(
            post=Operation(
                operation_id=operation_id,
                summary=f"Create {what} (OpenAI-compatible)",
                request_body=RequestBody(content=body, required=True),
                responses={
                    "200": OpenAPIResponse(
                        description=f"{what[0].upper()}{what[1:]}, OpenAI's format",
                        content=body,
                    )
                },
            )
        )
    openapi.paths = paths


ROUTES = [chat_completions, embeddings, list_models, get_model]
