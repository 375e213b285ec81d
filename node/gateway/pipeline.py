"""The request pipeline: one request from its caller to its settlement, whatever API it came by.

An ingress (`node/ingress/openai.py` is the model) decodes its request into the adapters'
internal call (`ChatCall`, `EmbedCall`, `CompletionCall`, `ImageCall`), builds the `Caller`
from HTTP, and hands both here:

- `begin`: the model allowlist, the plan (which deployments, in order), the re-sync of our chain
  with a peer that asks, and admission (rate limits, the response cache's kept answer looked
  up, the worst case reserved in every budget unless that answer is served for nothing);
- `complete` and `stream` first run the caller's guardrails (`node/gateway/guardrails/`) on
  the call as it will be sent, native request included: a block settles it as refused, a
  redaction rewrites it; their output checks then redact the answer, streamed or not;
- `complete`: the upstream call along the plan (fallback on failures, each one recorded), the
  answer settled, our receipt issued for a peer, the serving peer's receipt taken;
- `stream`: the stream opened with fallback before its first event, then relayed: the adapter's
  events are passed on as they are, with the pipeline's own `ReceiptIssued`, `StreamFailed`
  and `StreamEnd` among them; it is settled however it ends.

What comes back is typed (`Answer`, `Streamed`, `Facts`); failures are domain errors
(`node.errors.HubError`). The ingress renders both in its own format: nothing here knows HTTP.
A client that goes away cancels the upstream call through the ingress's watcher (`Watch`); a
peer's plain request runs to its end instead, for its receipt (see `_route`).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, NamedTuple, NoReturn, TypeVar

import anyio
import msgspec

from adapters.tokens import estimate_prompt_tokens
from adapters.types import (
    ChatCall,
    ChatRequest,
    ChatResult,
    ChatStream,
    CompletionCall,
    EmbedResult,
    UpstreamError,
    Usage,
    WireResult,
)
from node.errors import HubError, Kind, UpstreamFailed, gateway_failure
from node.gateway.accounting import CLIENT_CLOSED, OK, Accounting, Elastic, recorded_status
from node.gateway.auth import Principal
from node.gateway.cache import CacheSlot, Kept, event_bytes, kept_result
from node.gateway.guardrails.checks import Profile
from node.gateway.policy import model_allowed, worst_case_prompt_tokens
from node.gateway.router import NoRoute, Route
from node.hub import Hub

T = TypeVar("T")
log = logging.getLogger("aihub.gateway")
# A request id a peer sends us, to name its receipt by.
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# The kinds of request a deployment serves (`Deployment.kind`).
KINDS = ("chat", "embeddings", "completions", "images", "moderations")

# The ingress's watcher of its client: an async context manager that cancels its block if the
# client goes away first (a `HubError` of kind CLIENT_CLOSED then comes out of it).
Watch = Callable[[], AbstractAsyncContextManager[None]]


class Caller(msgspec.Struct, frozen=True):
    """Who asks, as the ingress found out from HTTP, once the key (and, for a peer, its
    signature over the body) checked out."""

    principal: Principal
    ip: str | None
    # Served from this node's own deployments only: a peer's request, or one that already
    # went through a node (no loops, no reselling).
    local_only: bool
    # The id a peer names its request by (its receipt is named by it), as sent: unchecked.
    peer_request_id: str = ""
    # The caller's W3C `traceparent`, as sent (unchecked), when the node traces requests.
    traceparent: str = ""
    # A peer's chat call whose `max_tokens` is the peer's own bound, not its client's: it
    # may be served capped lower, like a request without max_tokens (`begin_chat`).
    output_elastic: bool = False


class Facts(msgspec.Struct):
    """What the ingress may tell its client of a request, besides the answer."""

    request_id: str
    # The rate-limit figures of the tightest scope (`x-ratelimit-*` names).
    limits: dict[str, str]
    cost_micros: int | None = None
    # Our signed receipt, for a peer's request.
    receipt: bytes | None = None
    # The name of the peer that served the answer, if a peer did.
    served_by: str | None = None
    # The output tokens (per choice) the answer was capped at: a request without max_tokens
    # whose budget had less left than its full worst case (`begin_chat`).
    output_cap: int | None = None
    # "hit" (answered from the response cache) or "miss" (asked, and kept); None: not cached.
    cache: str | None = None


class Answer(msgspec.Struct):
    """A complete answer, settled: the adapter's result, as it returned it."""

    result: ChatResult | EmbedResult | WireResult
    facts: Facts


class Signal(msgspec.Struct, tag_field="signal"):
    """An item of a stream that is the pipeline's own, not one of the adapter's events."""


class ReceiptIssued(Signal, tag="receipt"):
    """Our signed receipt for a peer's stream, before its end: the consumer keeps it."""

    receipt: bytes


class StreamFailed(Signal, tag="failed"):
    """The stream broke after its first event: too late to fall back or answer otherwise."""

    error: HubError


class StreamEnd(Signal, tag="end"):
    """The stream is complete."""


class Streamed(NamedTuple):
    """A stream, opened: its items (the adapter's events and the pipeline's `Signal`s)."""

    items: AsyncGenerator[Any, None]
    facts: Facts
    # Settles the request if `items` never started (a generator closed before its first
    # step runs none of its code, its `finally` included).
    abandon: Callable[[], Awaitable[None]]


class Admitted(NamedTuple):
    """A request let through: its books, and the deployments to try, in order; with the
    cache slot it was admitted with, the answer kept there (`begin`)."""

    books: Accounting
    plan: list[Route]
    cache: CacheSlot | None = None
    kept: Kept | None = None


def may_use(principal: Principal, model: str) -> bool:
    """Whether the key's (and its tenant's) allowlist lets it use `model`."""
    name = model.partition("@")[0]  # `llama3@alice` is llama3, from one peer
    allowed = model_allowed(principal.key.limits.models, name)
    if allowed and principal.tenant is not None:
        allowed = model_allowed(principal.tenant.limits.models, name)
    return allowed


def _check_model(principal: Principal, model: str) -> None:
    if not may_use(principal, model):
        raise HubError(
            Kind.FORBIDDEN,
            f"This key may not use the model `{model}`",
            code="model_not_allowed",
            param="model",
        )


def _plan(hub: Hub, principal: Principal, model: str, kind: str, local_only: bool) -> list[Route]:
    try:
        return hub.router.plan(
            model, kind, local_only=local_only, allowed=lambda name: may_use(principal, name)
        )
    except NoRoute:
        others = [other for other in KINDS if other != kind]
        if any(hub.router.serves(model, other, local_only=local_only) for other in others):
            message = f"The model `{model}` does not serve {kind}"
            raise HubError(
                Kind.INVALID_REQUEST, message, param="model", code="model_not_supported"
            ) from None
        revoked_by = None if local_only else hub.router.revoked_by(model)
        if revoked_by is not None:
            message = (
                f"The peer `{revoked_by}` revoked this node's access: `{model}` is no longer "
                "served here"
            )
            raise HubError(Kind.REFUSED, message, param="model", code="peer_revoked") from None
        message = f"The model `{model}` does not exist on this node"
        raise HubError(Kind.NOT_FOUND, message, param="model", code="model_not_found") from None


async def _current_plan(
    hub: Hub, principal: Principal, model: str, kind: str, local_only: bool
) -> list[Route]:
    """`_plan`; a model not found is looked for again once the peers another process of the
    node changed are reloaded (a peer's model that `aihub join` has just said is available,
    which this worker would otherwise learn within the second). Only a miss pays for it."""
    try:
        return _plan(hub, principal, model, kind, local_only)
    except HubError as exc:
        if exc.code != "model_not_found" or not await hub.peering.catch_up():
            raise
    return _plan(hub, principal, model, kind, local_only)


def chat_worst_case(chat: ChatRequest, plan: list[Route]) -> Usage:
    """The most a chat request may use on this plan: its prompt, and the output it may ask
    (its max_tokens, else the deployments' `reserve_output_tokens`, at most their
    `max_output_tokens`)."""
    prompt = worst_case_prompt_tokens(
        chat, lambda: [(r.adapter.upstream.provider, r.adapter.upstream.model) for r in plan]
    )
    ceiling = _output_ceiling(plan)
    # No max_tokens: what the deployments say such a request reserves.
    asked = chat.output_limit or _reserved_output(plan, ceiling)
    output = min(asked, ceiling) * (chat.n or 1)
    return Usage(prompt, output, prompt + output)


# The two below are loops, not `max` over a generator: a generator is a call per route and
# one more, on every chat request.
def _output_ceiling(plan: list[Route]) -> int:
    """The most output any deployment of the plan writes (`max_output_tokens`)."""
    ceiling = plan[0].spec.max_output_tokens
    for route in plan[1:]:
        if route.spec.max_output_tokens > ceiling:
            ceiling = route.spec.max_output_tokens
    return ceiling


def _reserved_output(plan: list[Route], ceiling: int) -> int:
    """The most output a request without max_tokens reserves on the plan: each deployment's
    `reserve_output_tokens`, else the `ceiling`."""
    reserved = plan[0].spec.reserve_output_tokens or ceiling
    for route in plan[1:]:
        reserve = route.spec.reserve_output_tokens or ceiling
        if reserve > reserved:
            reserved = reserve
    return reserved


# A chat request without max_tokens whose budget has less left than its full worst case is
# served capped at what is left, down to this many output tokens per choice; below, refused.
LEAST_OUTPUT_TOKENS = 64


async def begin_chat(
    hub: Hub, caller: Caller, call: ChatCall, cache: CacheSlot | None = None
) -> Admitted:
    """`begin` for a chat call, whichever surface spelled it. A call without an output limit
    (or a peer's whose limit is the peer's own bound: `Caller.output_elastic`) that was
    admitted capped (less budget left than its worst case) gets that cap as its
    `max_tokens`, so that every adapter tells its upstream to write no more than was
    reserved; the raw fields lose any null limit the client sent, for the same reason. With
    a `cache` slot, an answer kept there that costs nothing needs no budget (`begin`)."""
    chat = call.request
    elastic = None
    if not chat.output_limit or caller.output_elastic:
        elastic = Elastic(LEAST_OUTPUT_TOKENS, chat.n or 1)
    admitted = await begin(
        hub,
        caller,
        chat.model,
        "chat",
        call.request_id,
        lambda plan: chat_worst_case(chat, plan),
        elastic,
        cache,
        bool(chat.stream),
    )
    cap = admitted.books.output_cap
    if cap is not None:
        call.request = msgspec.structs.replace(chat, max_tokens=cap, max_completion_tokens=None)
        call.raw = {k: v for k, v in call.raw.items() if k not in _OUTPUT_LIMIT_FIELDS}
    return admitted


_OUTPUT_LIMIT_FIELDS = ("max_tokens", "max_completion_tokens")


def _failed_in_gateway(books: Accounting, exc: Exception) -> NoReturn:
    """Whatever escapes `begin`, `complete` or `stream` while the request holds reservations
    and parallel slots (other than a domain error, which `Accounting.fail` settled), they
    are released (the request is settled as failed) and the client is told of a gateway
    failure, never left with a budget stranded until a restart. Settling is once: a request
    that was settled already is only answered. Each of them calls this from a plain
    `try`/`except`: an `asynccontextmanager` here was a generator, its context manager and
    five calls a use, twice a request."""
    log.exception("request %s failed in the gateway", books.request_id)
    books.fail(gateway_failure(exc))


async def begin(
    hub: Hub,
    caller: Caller,
    model: str,
    kind: str,
    request_id: str,
    worst: Callable[[list[Route]], Usage],
    elastic: Elastic | None = None,
    cache: CacheSlot | None = None,
    streamed: bool = False,
) -> Admitted:
    """Everything between the key and the upstream call: which model, which routes, and is
    the request admitted under its limits and budgets (an `elastic` one perhaps capped)?
    With a `cache` slot, the kept answer is looked up once the rate limits let it through:
    a hit that is not billed (`[cache] bill_hits` off) reserves nothing, so that a spent
    budget still gets what costs it nothing."""
    principal = caller.principal
    _check_model(principal, model)
    plan = await _current_plan(hub, principal, model, kind, caller.local_only)
    books = Accounting(hub, principal, request_id, model, kind)
    books.traceparent = caller.traceparent
    if books.for_peer and _REQUEST_ID.fullmatch(caller.peer_request_id):
        books.receipt_id = caller.peer_request_id
    if books.for_peer and not hub.resync.synced(principal.key.peer_id or ""):
        try:  # before anything is spent: no receipt from a chain head the peer may be past
            await hub.resync.ensure(principal.key.peer_id or "")
        except HubError as exc:
            books.fail(exc)
    try:
        await books.admit_rates(caller.ip)
        kept = await _cached(books, cache, streamed) if cache is not None else None
        free = kept is not None and not hub.cache.config.bill_hits
        await books.reserve(caller.ip, plan, worst(plan), elastic, free)
    except HubError:
        raise  # settled by `Accounting.fail`
    except Exception as exc:
        _failed_in_gateway(books, exc)
    return Admitted(books, plan, cache, kept)


async def _route(
    books: Accounting,
    plan: list[Route],
    attempt: Callable[[Route], Awaitable[T]],
    watch: Watch,
) -> tuple[T, Route]:
    """Run `attempt` along the plan; a failure is recorded and raised as a domain error. A
    client that goes away cancels the call; a peer's does not: the provider pays its upstream
    for the answer either way, so the answer runs to its end and gets its receipt (the peer's
    cap is charged for it) whether or not the peer is still there to read it."""
    try:
        async with contextlib.nullcontext() if books.for_peer else watch():
            return await books.hub.router.run(plan, attempt, books.upstream_failed, books.attempts)
    except UpstreamError as exc:
        books.fail(UpstreamFailed(exc))
    except HubError as exc:
        books.fail(exc)
    except Exception as exc:
        log.exception("request %s failed in the gateway", books.request_id)
        books.fail(gateway_failure(exc))
    except BaseException:
        books.finish(
            None, Usage(), estimated=False, status=CLIENT_CLOSED, stream=False, error="cancelled"
        )
        raise


def _profile_for(books: Accounting, call: ChatCall | CompletionCall | None) -> Profile | None:
    """The caller's guardrail profile, if one applies to the call (nothing imported when none
    does)."""
    return None if call is None else books.hub.guardrails.profile_for(books.principal)


async def _guard_input(
    books: Accounting, profile: Profile, call: ChatCall | CompletionCall
) -> None:
    """The profile's input checks run on the call (a refusal settles the request)."""
    try:
        await books.hub.guardrails.screen_input(profile, call, books)
    except HubError as exc:
        books.fail(exc)


async def complete(
    admitted: Admitted,
    attempt: Callable[[Route], Awaitable[ChatResult | EmbedResult | WireResult]],
    watch: Watch,
    call: ChatCall | CompletionCall | None = None,
    cache: CacheSlot | None = None,
) -> Answer:
    """The upstream call, then the answer settled: with our receipt if a peer asked, keeping
    the receipt of the peer that served it if we asked one. `call` is what `attempt` sends,
    for the guardrails (an embedding's is not read). With a `cache` slot, a kept answer is
    the answer (once the input passed the guardrails, and screened as a fresh one is)."""
    books, plan = admitted.books, admitted.plan
    try:
        # The guardrails', the cache's and the receipts' hooks are awaited only for a request
        # that has them: each await of a coroutine that has nothing to do is still a
        # coroutine made, run and finished (seven a request).
        profile = _profile_for(books, call)
        if profile is not None and call is not None:
            await _guard_input(books, profile, call)
        kept = await _kept_for(admitted, cache, False) if cache is not None else None
        if kept is not None:
            assert kept.result is not None
            replayed = _screen(books, profile, kept.result)
            if profile is not None:
                await _moderate(books, profile, replayed, None)
            return _cached_answer(books, plan, replayed)
        result, route = await _route(books, plan, attempt, watch)
        result = _screen(books, profile, result)
        if profile is not None:
            await _moderate(books, profile, result, route)
        books.observe_latency()
        _log_answer(books, result)
        cost = books.finish(
            route, result.usage, estimated=result.usage_estimated, status=OK, stream=False
        )
        # Only a peer's request is settled with a receipt (`Accounting.finish`).
        receipt = await books.issue_receipt() if books.for_peer else None
        books.take_receipt(route, result.receipt, cost)
        if cache is not None:
            await _keep_result(books, cache, result)
        facts = Facts(
            books.request_id, books.limits, cost, receipt, route.peer_name, books.output_cap
        )
        facts.cache = "miss" if cache is not None else None
        return Answer(result, facts)
    except HubError:
        raise  # settled by `Accounting.fail`
    except Exception as exc:
        _failed_in_gateway(books, exc)


R = TypeVar("R", ChatResult, EmbedResult, WireResult)


def _screen(books: Accounting, profile: Profile | None, result: R) -> R:
    """An answer through the guardrails' output checks, if a profile applies (a kept one
    too: the profile of the key that asks now, not of the one that was answered)."""
    if profile is None or isinstance(result, EmbedResult):
        return result
    return books.hub.guardrails.screen_result(profile, result, books)


async def _moderate(
    books: Accounting,
    profile: Profile | None,
    result: ChatResult | EmbedResult | WireResult,
    route: Route | None,
) -> None:
    """A complete answer through the profile's moderation deployments, if it has any: one
    that blocks it settles the request (what `route` produced is paid for) and raises."""
    if profile is None or not profile.moderated or isinstance(result, EmbedResult):
        return
    blocked = await books.hub.guardrails.moderate_answer(profile, result, books)
    if blocked is not None:
        estimated, error = result.usage_estimated, blocked.message[:500]
        status = recorded_status(blocked)
        books.finish(
            route, result.usage, estimated=estimated, status=status, stream=False, error=error
        )
        raise blocked


# --- the interaction log's hooks (`node/gateway/interaction_log.py`) --------------------------


def _log_answer(books: Accounting, result: ChatResult | EmbedResult | WireResult) -> None:
    if books.log is not None and isinstance(result, ChatResult):
        books.log.answered(result)


async def _logged(books: Accounting, items: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
    """A stream's items passed on, the adapter's events noted in its interaction log."""
    assert books.log is not None
    async with contextlib.aclosing(items):
        async for item in items:
            if not isinstance(item, Signal):
                books.log.streamed(item)
            yield item


# --- the response cache's hooks (`node/gateway/cache.py`) ----------------------------------


async def _cached(books: Accounting, cache: CacheSlot | None, streamed: bool) -> Kept | None:
    """The answer kept in the slot, if it is of the form asked (a stream's events, or a
    complete result)."""
    kept = await books.hub.cache.get(cache) if cache is not None else None
    if kept is None or (kept.events is not None if streamed else kept.result is not None):
        return kept
    return None


async def _kept_for(admitted: Admitted, cache: CacheSlot | None, streamed: bool) -> Kept | None:
    """The kept answer `begin` found in the slot (looked up only once), else in this one."""
    if cache is not None and cache == admitted.cache:
        return admitted.kept
    return await _cached(admitted.books, cache, streamed)


async def _keep_result(
    books: Accounting, cache: CacheSlot | None, result: ChatResult | EmbedResult | WireResult
) -> None:
    if cache is not None and isinstance(result, ChatResult):
        await books.hub.cache.keep(cache, kept_result(result))


def _settle_hit(
    books: Accounting, plan: list[Route], usage: Usage, estimated: bool, stream: bool, status: int
) -> int:
    """A hit's usage record: what the kept answer used, charged only if the config says
    so (at the plan's first deployment's price), and marked as a hit."""
    pricing = plan[0] if books.hub.cache.config.bill_hits else None
    status, error = _withheld(books, status, None)
    return books.finish(
        pricing, usage, estimated=estimated, status=status, stream=stream, error=error,
        cache_hit=True,
    )  # fmt: skip


def _withheld(books: Accounting, status: int, error: str | None) -> tuple[int, str | None]:
    """What the usage record of a stream that ended well says: the guardrails' block if
    their moderation withheld it at its end (`books.withheld`), though it was answered."""
    if status == OK and books.withheld is not None:
        return recorded_status(books.withheld), books.withheld.message[:500]
    return status, error


def _cached_answer(books: Accounting, plan: list[Route], result: ChatResult) -> Answer:
    books.observe_latency()
    _log_answer(books, result)
    cost = _settle_hit(books, plan, result.usage, result.usage_estimated, False, OK)
    facts = Facts(books.request_id, books.limits, cost, output_cap=books.output_cap, cache="hit")
    return Answer(result, facts)


def _cached_stream(books: Accounting, plan: list[Route], kept: Kept) -> Streamed:
    books.observe_latency()

    async def abandon() -> None:
        if not books.settled:
            _settle_hit(books, plan, Usage(), False, True, CLIENT_CLOSED)

    facts = Facts(books.request_id, books.limits, output_cap=books.output_cap, cache="hit")
    return Streamed(_replay(books, plan, kept), facts, abandon)


async def _replay(books: Accounting, plan: list[Route], kept: Kept) -> AsyncGenerator[Any, None]:
    """A kept stream's events as the upstream sent them, then its end."""
    status = CLIENT_CLOSED
    try:
        for event in kept.events or []:
            yield event
        status = OK
        yield StreamEnd()
    finally:
        _settle_hit(books, plan, kept.usage, kept.usage_estimated, True, status)


class _Recording:
    """A stream's events as the client is sent them (after the output guardrails), for the
    cache, until they outgrow what it keeps; its usage once the relay saw it complete."""

    def __init__(self, slot: CacheSlot, limit: int) -> None:
        self.slot = slot
        self.events: list[Any] | None = []
        self._left = limit
        self.usage: tuple[Usage, bool] | None = None

    def add(self, event: Any) -> None:
        if self.events is None:
            return
        self._left -= event_bytes(event)
        if self._left < 0:
            self.events = None
        else:
            self.events.append(event)


async def _recorded(
    books: Accounting, recording: _Recording, items: AsyncGenerator[Any, None]
) -> AsyncGenerator[Any, None]:
    """A stream's items passed on, its events recorded as they leave; kept at its end if
    the relay saw it complete (even if the client goes away meanwhile)."""
    async with contextlib.aclosing(items):
        async for item in items:
            if not isinstance(item, Signal):
                recording.add(item)
            elif isinstance(item, StreamEnd) and recording.usage and recording.events is not None:
                kept = Kept(*recording.usage, events=recording.events)
                with anyio.CancelScope(shield=True):
                    await books.hub.cache.keep(recording.slot, kept)
            yield item


class _Opened(msgspec.Struct):
    stream: ChatStream
    events: AsyncIterator[Any]
    first: Any | None


# How a stream is opened at one deployment: a chat stream (`Adapter.open_stream`) unless the
# ingress says otherwise (a legacy completion's).
Opener = Callable[[Route], Awaitable[ChatStream]]


def _chat_opener(call: ChatCall) -> Opener:
    return lambda route: route.adapter.open_stream(call)


async def _open(route: Route, opener: Opener) -> _Opened:
    """Open a stream and read its first event, so that a failure before the first byte can
    still fall back to the next deployment."""
    stream = await opener(route)
    events = aiter(stream)
    try:
        first = await anext(events, None)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await stream.aclose()
        raise
    return _Opened(stream, events, first)


async def stream(
    admitted: Admitted,
    call: ChatCall | CompletionCall,
    watch: Watch,
    opener: Opener | None = None,
    cache: CacheSlot | None = None,
) -> Streamed:
    """Open the stream along the plan (a chat call's, unless `opener` opens another kind,
    whose stream then always holds its `usage`); its relay settles it however it ends
    (`abandon` settles it if the relay never runs). With a `cache` slot, kept events are
    replayed, and a fresh stream that completes is kept."""
    books, plan = admitted.books, admitted.plan
    if opener is None:
        assert isinstance(call, ChatCall)
        opener = _chat_opener(call)
    opening = opener
    try:
        profile = _profile_for(books, call)
        if profile is not None and call is not None:
            await _guard_input(books, profile, call)
        kept = await _kept_for(admitted, cache, True) if cache is not None else None
        recording = None
        if kept is not None:
            streamed = _cached_stream(books, plan, kept)
        else:
            if cache is not None:
                recording = _Recording(cache, books.hub.cache.config.max_answer_bytes)
            streamed = await _fresh_stream(books, plan, call, opening, watch, recording)
        return _screened(books, profile, call, streamed, recording)
    except HubError:
        raise  # settled by `Accounting.fail`
    except Exception as exc:
        _failed_in_gateway(books, exc)


async def _fresh_stream(
    books: Accounting,
    plan: list[Route],
    call: ChatCall | CompletionCall,
    opener: Opener,
    watch: Watch,
    recording: _Recording | None,
) -> Streamed:
    """The stream opened along the plan, relayed (and its usage given to `recording`, to be
    kept with a cache slot)."""
    opened, route = await _route(books, plan, lambda r: _open(r, opener), watch)
    books.observe_latency()
    facts = Facts(
        books.request_id,
        books.limits,
        served_by=route.peer_name,
        output_cap=books.output_cap,
        cache="miss" if recording is not None else None,
    )
    return Streamed(
        _relay(opened, route, call, books, recording),
        facts,
        lambda: _abandon(opened, route, call, books),
    )


def _screened(
    books: Accounting,
    profile: Profile | None,
    call: ChatCall | CompletionCall,
    streamed: Streamed,
    recording: _Recording | None = None,
) -> Streamed:
    """A stream's items as they leave: through the guardrails' output checks and moderation
    deployments if its profile has any (a replayed stream too, with the profile of the key
    that asks now), then kept for the cache and logged as the client sees them."""
    items = streamed.items
    if profile is not None and profile.output and isinstance(call, ChatCall):
        items = books.hub.guardrails.guard_stream(profile, items, books)
    if profile is not None and profile.moderated and isinstance(call, ChatCall):
        # After the in-process checks: the deployment reads what the client was sent.
        items = books.hub.guardrails.moderate_stream(profile, items, books)
    if recording is not None:
        items = _recorded(books, recording, items)
    if books.log is not None:
        items = _logged(books, items)
    return streamed._replace(items=items)


async def _abandon(
    opened: _Opened, route: Route, call: ChatCall | CompletionCall, books: Accounting
) -> None:
    """A stream whose relay never ran (it failed or was cancelled before its first event was
    asked for): settled as its relay would have settled it."""
    if not books.settled:
        await _settle_stream(opened, route, call, books, 0, CLIENT_CLOSED, "stream not sent")


async def _relay(
    opened: _Opened,
    route: Route,
    call: ChatCall | CompletionCall,
    books: Accounting,
    recording: _Recording | None = None,
) -> AsyncGenerator[Any, None]:
    """Pass the upstream's events on; account for them however the stream ends (and, with
    a `recording`, tell it what the stream used if it ends complete: it is kept then)."""
    stream = opened.stream
    sent = 0
    status, error = OK, None
    try:
        if opened.first is not None:
            yield opened.first
            sent += 1
        async for event in opened.events:
            yield event
            sent += 1
        if recording is not None:
            recording.usage = _stream_usage(stream, call, sent)
        if books.for_peer:
            # The receipt goes before the end, as an item of its own that the consumer keeps.
            usage, estimated = _stream_usage(stream, call, sent)
            books.finish(route, usage, estimated=estimated, status=OK, stream=True)
            # The answer is complete: its records and receipt are written even if the peer
            # goes away meanwhile (a cancelled transaction would lose the usage record).
            with anyio.CancelScope(shield=True):
                receipt = await books.issue_receipt()
            if receipt is not None:
                yield ReceiptIssued(receipt)
        yield StreamEnd()
    except UpstreamError as exc:
        # Too late to fall back: the client has events already. The ingress tells it.
        status, error = exc.status, exc.message
        yield StreamFailed(UpstreamFailed(exc))
    except Exception as exc:
        # Nothing expected it (a bug, or an upstream event no parser covers): the same.
        log.exception("stream %s failed in the gateway", books.request_id)
        failure = gateway_failure(exc)
        status, error = recorded_status(failure), failure.message
        yield StreamFailed(failure)
    except BaseException:
        status, error = CLIENT_CLOSED, "client closed the stream"
        raise
    finally:
        await _settle_stream(opened, route, call, books, sent, status, error)


async def _settle_stream(
    opened: _Opened,
    route: Route,
    call: ChatCall | CompletionCall,
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
    recorded, why = _withheld(books, status, error)  # answered and paid for, maybe withheld
    cost = books.finish(route, usage, estimated=estimated, status=recorded, stream=True, error=why)
    if status == OK:
        books.take_receipt(route, stream.receipt, cost)
    else:
        # A peer that went away (or an upstream that failed) before the end still got
        # what was sent: its receipt is written for that, and its cap charged.
        with anyio.CancelScope(shield=True):
            await books.issue_receipt()


def _stream_usage(
    stream: ChatStream, call: ChatCall | CompletionCall, sent: int
) -> tuple[Usage, bool]:
    """What a stream used, as the upstream counted it, or estimated if it was cut short:
    the prompt and roughly one token per event delivered."""
    if stream.usage is not None or not isinstance(call, ChatCall):
        assert stream.usage is not None  # a stream of another kind always holds its usage
        return stream.usage, stream.usage_estimated
    prompt = estimate_prompt_tokens(call.request.messages)
    return Usage(prompt, sent, prompt + sent), True
