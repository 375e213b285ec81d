"""One request's books: what it holds, what it costs, the one usage record that settles it.

`Accounting` is the request pipeline's ledger of a single request (`node/gateway/pipeline.py`
drives it): the rate-limit slots and budget reservations it was admitted with, the charge once
it ends, the usage record, our receipt if a peer asked, and the receipt of the peer that served
it if we asked one. Whatever way a request ends, it is settled exactly once.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import NamedTuple, NoReturn

from adapters.types import UpstreamError, Usage
from ledger.receipts import SentRequest
from node.errors import HubError, Kind, UpstreamFailed
from node.gateway.auth import Principal
from node.gateway.interaction_log import LogDraft
from node.gateway.ratelimit import Admission, RateLimited, ScopeLimits
from node.gateway.router import Route
from node.gateway.traces import AttemptTrace, RequestTrace
from node.gateway.usage import MICROS_PER_MILLION_TOKENS, clamp_usage, cost_micros
from node.hub import Hub
from node.storage.records import Charge, Hold, UsageRecord, now_ms

log = logging.getLogger("aihub.gateway")

# The usage record's `status` (and the status of what we sent a peer, in the ledger's
# `SentRequest`) speaks HTTP's numbers, as the records always have: what the request's outcome
# was, not how an ingress answers it.
OK = 200
CLIENT_CLOSED = 499
_RECORDED: dict[Kind, int] = {
    Kind.INVALID_REQUEST: 400,
    Kind.UNAUTHENTICATED: 401,
    Kind.FORBIDDEN: 403,
    Kind.REFUSED: 403,
    Kind.NOT_FOUND: 404,
    Kind.CONFLICT: 409,
    Kind.GONE: 410,
    Kind.TOO_LARGE: 413,
    Kind.RATE_LIMITED: 429,
    Kind.OVER_BUDGET: 429,
    Kind.CLIENT_CLOSED: CLIENT_CLOSED,
    Kind.INTERNAL: 500,
    Kind.GATEWAY_FAILURE: 502,
    Kind.PEER_FAILURE: 502,
    Kind.UNAVAILABLE: 503,
    Kind.PEER_TIMEOUT: 504,
}


class Elastic(NamedTuple):
    """A chat request that set no output limit: when its budget has less left than its full
    worst case, it may be served capped at fewer output tokens per choice, down to `least`,
    instead of refused. Its answer is then cut at that cap (the upstream is told it), so
    what it is charged never passes what was reserved."""

    least: int
    choices: int


def recorded_status(exc: HubError) -> int:
    """The status a failed request's usage record keeps."""
    if isinstance(exc, UpstreamFailed):
        return exc.upstream.status
    return _RECORDED[exc.kind]


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
        # Traced (only when tracing is on): when it began, and each attempt the router made.
        self.started_ns = time.time_ns() if hub.tracing is not None else 0
        self.attempts: list[AttemptTrace] | None = [] if hub.tracing is not None else None
        self.traceparent = ""
        self.admission: Admission | None = None
        self.holds: list[Hold] = []
        self._settled = False
        # A peer's request is receipted: priced as advertised, its receipt signed and kept.
        self.for_peer = principal.key.peer_id is not None
        self._for_receipt: Charge | None = None
        self.receipt_id = request_id
        # The worst case admitted, and what was reserved for it: the bounds of what the
        # request may be said to have used, and charged.
        self.worst = Usage()
        self.reserved = 0
        # Output tokens per choice the upstream call is capped at, when the budget left was
        # less than the full worst case of a request without max_tokens (`Elastic`).
        self.output_cap: int | None = None
        # The request's interaction log while it runs, if its key or tenant logs requests.
        self.log: LogDraft | None = None
        # What the guardrails replaced in the request (`guardrails/stage.py`), for what the
        # node keeps of it: applied to any text, it gives the text as the upstream saw it.
        self.redaction: Callable[[str], str] | None = None
        # A streamed answer the guardrails' moderation withheld at its end (the client was
        # sent this error instead): what its usage record says, though the upstream answered.
        self.withheld: HubError | None = None

    @property
    def limits(self) -> dict[str, str]:
        """The rate-limit figures the request was admitted under (`x-ratelimit-*`)."""
        return self.admission.headers if self.admission is not None else {}

    async def admit(
        self, ip: str | None, plan: list[Route], worst: Usage, elastic: Elastic | None = None
    ) -> None:
        """Rate limits, then the worst-case cost reserved against every budget on the path
        (for an `elastic` request, what is left of it if that is less)."""
        await self.admit_rates(ip)
        await self.reserve(ip, plan, worst, elastic)

    async def admit_rates(self, ip: str | None) -> None:
        """The rate limits of every scope on the path (refused: settled and raised)."""
        principal, hub = self.principal, self.hub
        try:
            self.admission = await hub.limiter.admit(rate_scopes(principal))
        except RateLimited as exc:
            hub.keys.note("limit.rate", principal.key_id, ip, {"reason": exc.message})
            self.fail(
                HubError(
                    Kind.RATE_LIMITED,
                    exc.message,
                    code="rate_limit_exceeded",
                    retry_after=max(1, math.ceil(exc.retry_after)),
                    limits=exc.headers,
                )
            )

    async def reserve(
        self,
        ip: str | None,
        plan: list[Route],
        worst: Usage,
        elastic: Elastic | None = None,
        free: bool = False,
    ) -> None:
        """The worst-case cost reserved against every budget on the path (for an `elastic`
        request, what is left of it if that is less); nothing for a `free` one (a cached
        answer that costs nothing), whose worst case only bounds what it may be said to use."""
        principal, hub = self.principal, self.hub
        if free:
            self.worst = worst
            return
        price_in, price_out = _highest_prices(plan)
        self.worst = worst
        self.reserved = cost_micros(worst, price_in, price_out)
        try:
            self.holds = await hub.budgets.reserve(principal, self.reserved)
        except HubError as refused:
            if elastic is None or price_out == 0:
                self._refuse_for_budget(refused, ip, _reserved_words(worst))
            await self._reserve_what_is_left(ip, elastic, price_in, price_out)

    async def _reserve_what_is_left(
        self, ip: str | None, elastic: Elastic, price_in: int, price_out: int
    ) -> None:
        """The full worst case did not fit: reserve the most output the budgets have left
        (whole tokens per choice), or refuse if not even `elastic.least` fits."""
        worst = self.worst
        prompt = worst.prompt_tokens
        left = await self.hub.budgets.left(self.principal) or 0
        # The most output tokens t with cost_micros(prompt, t) <= left (costs round up).
        affordable = (left * MICROS_PER_MILLION_TOKENS - prompt * price_in) // price_out
        per_choice = min(affordable // elastic.choices, worst.completion_tokens // elastic.choices)
        # Below the floor, ask for the floor anyway: the refusal then says what it costs.
        per_choice = max(per_choice, min(elastic.least, worst.completion_tokens))
        output = per_choice * elastic.choices
        capped = Usage(prompt, output, prompt + output)
        reserved = cost_micros(capped, price_in, price_out)
        try:
            self.holds = await self.hub.budgets.reserve(self.principal, reserved)
        except HubError as refused:
            words = (
                "A request without max_tokens is served capped at what its budget has left, "
                f"down to {per_choice:,} output tokens"
            )
            self._refuse_for_budget(refused, ip, words)
        self.worst, self.reserved, self.output_cap = capped, reserved, per_choice

    def _refuse_for_budget(self, refused: HubError, ip: str | None, words: str) -> NoReturn:
        principal, hub = self.principal, self.hub
        exc = HubError(refused.kind, f"{refused.message}. {words}", code=refused.code)
        hub.keys.note("limit.budget", principal.key_id, ip, {"reason": exc.message})
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
        cache_hit: bool = False,
    ) -> int:
        """Settle the request (once): cost, usage record, reservations, limits, metrics. The
        counts are clamped to what the request could have used, and the charge to what was
        reserved for it: a budget never passes its cap, whatever the upstream reports; the
        record keeps what it cost beyond the charge (`unbilled_micros`). The charge.

        A cache hit (`cache_hit`) was served by no deployment: `route`, if given, only prices
        it (`[cache] bill_hits`), and nothing was asked of a peer."""
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
                else spec.unit_prices()
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
            deployment=route.label if route and not cache_hit else None,
            provider=spec.provider if spec and not cache_hit else None,
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
            cache_hit=cache_hit,
            log_id=self.request_id if self.log is not None else None,
        )
        if self.log is not None:
            self.hub.logs.settled(self.log, record, route.peer_name if route else None)
        sent = None if cache_hit else _sent(self.request_id, route, status)
        charge = Charge(record, self.hub.budgets.settle(self.holds, cost), sent)
        # Journaled now, written with the batch: a peer's request too, whose receipt alone is
        # committed before its answer completes (`issue_receipt`).
        self.hub.usage.record(charge)
        if self.for_peer and route is not None and (status == OK or usage.total_tokens):
            # Whatever was produced for a peer is receipted, whether or not the peer stayed
            # to the end of the answer.
            self._for_receipt = charge
        if self.admission is not None:
            self.hub.limiter.release(self.admission, usage.total_tokens)
        self.hub.metrics.settled(
            self.endpoint, self.model, status, usage.prompt_tokens, usage.completion_tokens, cost
        )
        if clamped or actual != cost:
            self.hub.metrics.untrusted(self.model, clamped, actual - cost)
        if self.hub.tracing is not None:
            self._trace(record)
        return cost

    def _trace(self, record: UsageRecord) -> None:
        assert self.hub.tracing is not None
        self.hub.tracing.record(
            RequestTrace(
                request_id=self.request_id,
                kind=self.endpoint,
                model=self.model,
                key_id=self.principal.key_id,
                start_ns=self.started_ns,
                end_ns=time.time_ns(),
                status=record.status,
                stream=record.stream,
                tokens_in=record.tokens_in,
                tokens_out=record.tokens_out,
                cost_micros=record.cost_micros,
                for_peer=self.for_peer,
                attempts=self.attempts or [],
                error=record.error,
                traceparent=self.traceparent,
            )
        )

    async def issue_receipt(self) -> bytes | None:
        """For a peer's request that was answered: our signed receipt, committed before the
        answer completes (its usage record was journaled when it was settled)."""
        charge, self._for_receipt = self._for_receipt, None
        if charge is None:
            return None
        peer_id = self.principal.key.peer_id or ""
        try:
            receipt = await self.hub.receipts.issue(
                charge, peer_id, self.receipt_id, self.principal.key_id
            )
        except Exception:
            # The answer is already paid for upstream, and its usage record kept.
            log.exception("could not issue a receipt to %s", peer_id)
            return None
        return receipt

    def take_receipt(self, route: Route, receipt: bytes | None, cost: int) -> None:
        """The receipt of the peer that served us, kept and countersigned off the path if it
        is for this very request, as we asked and priced it."""
        sent = _sent(self.request_id, route, OK)
        if sent is not None and receipt is not None:
            self.hub.receipts.take(sent, receipt, cost)

    def observe_latency(self) -> None:
        elapsed = time.perf_counter() - self.started
        self.hub.metrics.answered(self.endpoint, self.model, elapsed)

    def fail(self, exc: HubError) -> NoReturn:
        """Settle a request that got no answer (nothing is charged) and raise its error."""
        self.finish(
            None,
            Usage(),
            estimated=False,
            status=recorded_status(exc),
            stream=False,
            error=exc.message[:500],
        )
        raise exc


def _highest_prices(plan: list[Route]) -> tuple[int, int]:
    """The highest price in and the highest out on the plan (perhaps two routes'): what the
    worst case is reserved at. A loop, each route's prices asked once: two `max` over
    generators asked them twice."""
    price_in, price_out = plan[0].spec.unit_prices()
    for route in plan[1:]:
        unit_in, unit_out = route.spec.unit_prices()
        if unit_in > price_in:
            price_in = unit_in
        if unit_out > price_out:
            price_out = unit_out
    return price_in, price_out


def _reserved_words(worst: Usage) -> str:
    """What a refusal for budget adds: what the request reserved, and how to reserve less."""
    if worst.completion_tokens == 0:
        return "A request reserves its worst case"
    return (
        f"A request reserves its worst case: this one {worst.completion_tokens:,} output "
        "tokens; a lower max_tokens (or the model's reserve_output_tokens) reserves less"
    )


def _sent(request_id: str, route: Route | None, status: int) -> SentRequest | None:
    """For a request routed to a peer, the durable record of what we asked it (journaled
    with the usage record): the only request its receipt may bill."""
    if route is None or route.peer_id is None:
        return None
    spec = route.spec
    return SentRequest(
        request_id, route.peer_id, spec.name, route.price_seq, spec.price_in, spec.price_out, status
    )


def rate_scopes(principal: Principal) -> tuple[ScopeLimits, ...]:
    """The scopes a request is rate limited in (worked out once per principal:
    `Principal.rate_scopes`)."""
    return principal.rate_scopes
