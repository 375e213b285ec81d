"""The router: which deployment serves a request, in what order, and what happens on failure.

A model name maps to its deployments, ordered by the configured strategy, followed by the
deployments of its fallback model names. Each deployment gets `retries` more tries on a
retryable error (429, 5xx, timeouts, connection errors) with exponential backoff that honours
`Retry-After`; a deployment that fails `cooldown_failures` times in a row rests for
`cooldown_seconds` and is tried only after the rested ones. Whatever an upstream does, one
attempt is over by `attempt_timeout` (its answer, a stream's included, read to the end) and
the whole request by `request_timeout`: a 504 `deadline_exceeded`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from adapters.http import ATTEMPT_DEADLINE
from adapters.types import Adapter, UpstreamError
from node.config import Deployment, RouterSection
from node.gateway.traces import AttemptTrace

if TYPE_CHECKING:
    from node.gateway.cooldowns import CooldownBoard

T = TypeVar("T")

# Weight of the newest sample in the latency moving average.
LATENCY_ALPHA = 0.3
PEER_BACKOFF_MAX = 300.0


@dataclass(eq=False)
class Route:
    """A deployment at run time: its spec, its adapter, and what the router has learnt."""

    spec: Deployment
    adapter: Adapter
    position: int
    # For a route to another node: its node id and name (as in `model@name`).
    peer_id: str | None = None
    peer_name: str | None = None
    # For a route to another node: the seq of the advert it was built from (its prices).
    price_seq: int = 0
    in_flight: int = 0
    latency: float | None = None
    failures: int = 0
    cooldown_until: float = 0.0
    # Until when another worker of the node has it rest (`cooldowns.CooldownBoard`), as of
    # the last plan that included it; this process's clock, as `cooldown_until`.
    shared_until: float = 0.0
    wrr_current: int = field(default=0)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def label(self) -> str:
        """Distinguishes deployments sharing one model name, in metrics and usage records."""
        if self.peer_name is not None:
            return f"{self.spec.name}@{self.peer_name}"
        return f"{self.spec.name}#{self.position}:{self.spec.provider}"

    def cooling(self, now: float) -> bool:
        return self.cooldown_until > now or self.shared_until > now


class NoRoute(Exception):
    """No deployment serves this model name (for this kind of request)."""


class Router:
    def __init__(self, routes: list[Route], settings: RouterSection) -> None:
        self.settings = settings
        self.routes = routes
        # The local deployments' cooldowns shared with the node's other workers, if any.
        self.board: CooldownBoard | None = None
        self.by_name: dict[str, list[Route]] = {}
        for route in routes:
            self.by_name.setdefault(route.name, []).append(route)
        self.peer_by_name: dict[str, list[Route]] = {}
        # Model names (and `@peer` suffixes) that only a peer which revoked us served, and
        # that peer's name: what a client asking for them is told.
        self.revoked: dict[str, str] = {}

    def set_peer_routes(self, routes: list[Route], revoked: dict[str, str] | None = None) -> None:
        """Replace the routes to peers' models (from their adverts), keeping what was learnt
        about routes that stay; `revoked` as in `revoked_by`."""
        self.revoked = revoked or {}
        known = {(r.peer_id, r.name): r for rs in self.peer_by_name.values() for r in rs}
        by_name: dict[str, list[Route]] = {}
        for route in routes:
            old = known.get((route.peer_id, route.name))
            if old is not None:
                route.latency, route.failures = old.latency, old.failures
                route.cooldown_until = old.cooldown_until
            by_name.setdefault(route.name, []).append(route)
        self.peer_by_name = by_name

    def _candidates(self, model: str, kind: str, local_only: bool) -> list[Route]:
        """The routes serving `model` itself, unordered: local ones if there are any, else
        the peers advertising it."""
        # At the first `@`: a model's name has none (config and adverts alike), a peer's
        # name may (it chooses its own), so `model@a@b` is `model` of the peer `a@b`.
        name, at, peer = model.partition("@")
        if at and not local_only:
            # `model@peer` pins one peer's route.
            pinned = self.peer_by_name.get(name, ())
            return [r for r in pinned if peer in (r.peer_name, r.peer_id) and r.spec.kind == kind]
        local = [r for r in self.by_name.get(model, ()) if r.spec.kind == kind]
        if local or local_only:
            return local
        return [r for r in self.peer_by_name.get(model, ()) if r.spec.kind == kind]

    def revoked_by(self, model: str) -> str | None:
        """The peer that revoked our access, if `model` (or `model@peer`) was its alone."""
        _, at, peer = model.partition("@")
        if at:
            return self.revoked.get("@" + peer)
        if model in self.by_name or model in self.peer_by_name:
            return None
        return self.revoked.get(model)

    def serves(self, model: str, kind: str, *, local_only: bool = False) -> bool:
        return bool(self._candidates(model, kind, local_only))

    def plan(
        self,
        model: str,
        kind: str,
        *,
        local_only: bool = False,
        allowed: Callable[[str], bool] | None = None,
    ) -> list[Route]:
        """Every route worth trying for `model`, best first, fallbacks after: local
        deployments, then peers that advertise the model (unless `local_only`, as for a
        request that is itself from a peer). Only the fallback models that `allowed` passes
        are added: a key or invite for model X is never served model Y by way of a fallback."""
        # The model's own routes once (`serves` asked for them, then the plan again), and
        # the fallbacks' only if it has any: most models have none.
        own = self._candidates(model, kind, local_only)
        if not own:
            raise NoRoute(model)
        ordered = self._order(own)
        fallbacks = self.settings.fallbacks.get(model)
        if fallbacks:
            ordered = list(ordered)
            tried = {model}
            for name in fallbacks:
                if name in tried or (allowed is not None and not allowed(name)):
                    continue
                tried.add(name)
                ordered += self._order(self._candidates(name, kind, local_only))
        now = time.monotonic()
        if self.board is not None:
            _shared_rests(self.board, ordered, now)
        return _rested_first(ordered, now)

    def _order(self, routes: list[Route]) -> list[Route]:
        strategy = self.settings.strategy
        if len(routes) < 2:
            return routes
        if strategy == "lowest-cost":
            return sorted(routes, key=lambda r: (sum(r.spec.unit_prices()), r.position))
        if strategy == "lowest-latency":
            # Untried deployments first, so that every one gets measured.
            return sorted(routes, key=lambda r: (r.latency is not None, r.latency or 0.0))
        if strategy == "least-busy":
            return sorted(routes, key=lambda r: (r.in_flight, r.spec.priority, r.position))
        by_priority = sorted(routes, key=lambda r: (r.spec.priority, r.position))
        if strategy == "weighted":
            chosen = _smooth_weighted_pick(routes)
            return [chosen, *(r for r in by_priority if r is not chosen)]
        return by_priority

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        ceiling = min(self.settings.backoff_max, self.settings.backoff_base * 2**attempt)
        return ceiling * (0.5 + random.random() / 2)

    async def run(
        self,
        plan: list[Route],
        attempt: Callable[[Route], Awaitable[T]],
        on_failure: Callable[[Route, UpstreamError], None] | None = None,
        attempts: list[AttemptTrace] | None = None,
    ) -> tuple[T, Route]:
        """Try `attempt` along `plan` until one succeeds; raise the last error if none does.

        An error that is the request's own fault (a 400 from the provider) is raised at once:
        no other deployment would answer it differently. Each try is added to `attempts` when
        the request is traced.
        """
        last: UpstreamError | None = None
        clock = asyncio.get_running_loop().time
        ends = clock() + self.settings.request_timeout
        for route in plan:
            for retry in range(self.settings.retries + 1):
                if clock() >= ends:
                    raise request_deadline_error(self.settings.request_timeout)
                started = time.perf_counter()
                begun = time.time_ns() if attempts is not None else 0
                route.in_flight += 1
                try:
                    result = await self._attempt(route, attempt, ends)
                except UpstreamError as exc:
                    last = exc
                    if attempts is not None:
                        attempts.append(_traced(route, begun, exc.status, exc.type))
                    self._failed(route, exc)
                    if on_failure is not None:
                        on_failure(route, exc)
                    if exc.status in (400, 413, 422):
                        raise
                    if not exc.retryable or retry == self.settings.retries:
                        break
                    wait = self.backoff(retry, exc.retry_after)
                    if wait > self.settings.max_retry_wait or clock() + wait >= ends:
                        break
                    await asyncio.sleep(wait)
                    continue
                finally:
                    route.in_flight -= 1
                self._succeeded(route, time.perf_counter() - started)
                if attempts is not None:
                    attempts.append(_traced(route, begun, 200))
                return result, route
        if last is None:
            raise UpstreamError(503, "no deployment available", type="upstream_unavailable")
        raise last

    async def _attempt(
        self, route: Route, attempt: Callable[[Route], Awaitable[T]], request_ends: float
    ) -> T:
        """One try at one deployment, over by the attempt's deadline or the request's,
        whichever comes first. The adapters' HTTP calls take it from ATTEMPT_DEADLINE as
        their overall timeout, so that it bounds the answer read after this returns (a
        stream) too, with one timer per call."""
        ends = min(asyncio.get_running_loop().time() + self.settings.attempt_timeout, request_ends)
        token = ATTEMPT_DEADLINE.set(ends)
        try:
            return await attempt(route)
        finally:
            ATTEMPT_DEADLINE.reset(token)

    def _succeeded(self, route: Route, seconds: float) -> None:
        route.failures = 0
        if route.cooldown_until or route.shared_until:
            route.cooldown_until = route.shared_until = 0.0
            if self.board is not None and route.peer_id is None:
                self.board.clear(route.position)
        if route.latency is None:
            route.latency = seconds
        else:
            route.latency += LATENCY_ALPHA * (seconds - route.latency)

    def _failed(self, route: Route, exc: UpstreamError) -> None:
        if not exc.retryable and exc.status != 502:
            return
        route.failures += 1
        now = time.monotonic()
        if exc.retry_after is not None:
            route.cooldown_until = max(route.cooldown_until, now + exc.retry_after)
        if route.peer_id is not None:
            # A failing peer backs off exponentially: 1, 2, 4 … up to 5 minutes.
            rest = min(2.0 ** (route.failures - 1), PEER_BACKOFF_MAX)
            route.cooldown_until = max(route.cooldown_until, now + rest)
        elif route.failures >= self.settings.cooldown_failures:
            route.cooldown_until = max(route.cooldown_until, now + self.settings.cooldown_seconds)
        if self.board is not None and route.peer_id is None and route.cooldown_until > now:
            self.board.rest(route.position, time.time() + route.cooldown_until - now)


def _shared_rests(board: CooldownBoard, routes: list[Route], now: float) -> None:
    """What the other workers said of these deployments' rest (a memory read each)."""
    wall = time.time()
    for route in routes:
        if route.peer_id is None:
            rest = board.resting(route.position, wall)
            route.shared_until = now + rest if rest else 0.0


def _rested_first(routes: list[Route], now: float) -> list[Route]:
    """Rested deployments first; a cooling one is still better than failing outright. The
    routes as they are when none is cooling, as is usual: one pass, and a second only when
    some route cools."""
    rested = [r for r in routes if not r.cooling(now)]
    if len(rested) == len(routes):
        return routes
    return rested + [r for r in routes if r.cooling(now)]


def request_deadline_error(seconds: float) -> UpstreamError:
    return UpstreamError(
        504,
        f"The request's deadline ({seconds:g} s) passed before any deployment answered",
        type="timeout",
        code="deadline_exceeded",
    )


def _smooth_weighted_pick(routes: list[Route]) -> Route:
    """Nginx's smooth weighted round robin: an even spread in proportion to the weights."""
    total = 0
    best = routes[0]
    for route in routes:
        route.wrr_current += route.spec.weight
        total += route.spec.weight
        if route.wrr_current > best.wrr_current:
            best = route
    best.wrr_current -= total
    return best


def _traced(route: Route, begun: int, status: int, error: str | None = None) -> AttemptTrace:
    spec = route.spec
    return AttemptTrace(
        deployment=route.label,
        provider="aihub" if route.peer_id is not None else spec.provider,
        upstream_model=spec.model or spec.name,
        peer=route.peer_name,
        start_ns=begun,
        end_ns=time.time_ns(),
        status=status,
        error=error,
    )
