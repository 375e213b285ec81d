"""The app's state object: everything a running node holds, built at start-up, closed at exit."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from httpx_aiohttp import AiohttpTransport

from adapters import build_adapter
from adapters.http import POOL_IDLE_SECONDS, UpstreamClient
from federation.identity import NodeIdentity
from federation.nonces import NonceCache
from node.config import IDENTITY_FILE, Config, missing_secrets, store_target
from node.gateway.alerts import BudgetAlerts
from node.gateway.auth import KeyCache
from node.gateway.budgets import Budgets
from node.gateway.cache import ResponseCache
from node.gateway.cooldowns import CooldownBoard
from node.gateway.guardrails.stage import Guardrails
from node.gateway.interaction_log import InteractionLogger
from node.gateway.journal import JOURNAL_DIR, Journal, adopt_orphans
from node.gateway.keys import HASH_PURPOSE
from node.gateway.metrics import Metrics
from node.gateway.propagation import HEARTBEAT_SECONDS, Heartbeat
from node.gateway.ratelimit import RateLimiter
from node.gateway.router import Route, Router
from node.gateway.usage import UsageRecorder
from node.observe.tracing import Tracing, start_tracing
from node.peers.books.reconciliation import reconcile_all
from node.peers.nonce_claims import NonceClaims
from node.peers.peering import REFRESH_TICK, Peering
from node.peers.receipts import Receipts
from node.peers.resync import ChainResync
from node.storage import open_store
from node.storage.base import Store
from node.storage.records import StoreUnavailable
from node.turns import ours_this_turn

if TYPE_CHECKING:  # the hub is reached from a request; it needs no web framework to run
    from litestar import Request

log = logging.getLogger("aihub")

# Countersignatures go back to providers in batches, this often.
COUNTERSIGN_INTERVAL = 2
# Expired nonces and old rate counts are deleted, and a dead process's expired budget holds
# given back, this often (seconds): each is a few statements by index, once for the node.
PRUNE_INTERVAL = 5
# Each process renews its budget holds this often (they expire after HOLD_TTL, 15 s).
HOLD_RENEW_INTERVAL = 5
# Expired cached answers are forgotten this often (seconds); a read never returns one anyway.
CACHE_PRUNE_INTERVAL = 60
# The journal of a worker that died is looked for this often (seconds): a listing of the
# journal folder, and a replay when there is one (`journal.adopt_orphans`).
ORPHANS_INTERVAL = 2


def http_client(config: Config) -> httpx.AsyncClient:
    """The client for node-to-node federation traffic and webhooks (off the request path; the
    request path uses `UpstreamClient`). aiohttp's connection pool under httpx's API: httpx's
    own pool collapses under concurrency (encode/httpx#3215)."""
    limits = httpx.Limits(
        max_connections=config.upstream.max_connections,
        max_keepalive_connections=config.upstream.max_connections,
        keepalive_expiry=POOL_IDLE_SECONDS,
    )
    timeout = httpx.Timeout(config.upstream.read_timeout, connect=config.upstream.connect_timeout)
    return httpx.AsyncClient(transport=AiohttpTransport(limits=limits), timeout=timeout)


def build_router(config: Config, client: UpstreamClient, env: dict[str, str]) -> Router:
    routes = [
        Route(spec, build_adapter(spec.upstream(config.upstream, env), client), position)
        for position, spec in enumerate(config.models)
    ]
    return Router(routes, config.router)


@dataclass
class Hub:
    config: Config
    data_dir: Path
    identity: NodeIdentity
    store: Store
    keys: KeyCache
    router: Router
    client: httpx.AsyncClient  # node-to-node federation traffic and webhooks
    upstreams: UpstreamClient  # providers, and peers as upstreams: the hot path
    usage: UsageRecorder
    budgets: Budgets
    alerts: BudgetAlerts
    limiter: RateLimiter
    metrics: Metrics
    nonces: NonceCache
    nonce_claims: NonceClaims  # the durable record that refuses a replay (group commit)
    peering: Peering
    receipts: Receipts
    resync: ChainResync  # our chain heads learnt from each peer before we issue it receipts
    scheduler: AsyncIOScheduler
    started_at: int
    guardrails: Guardrails
    cache: ResponseCache  # answers kept per tenant, for keys, tenants or models that opt in
    logs: InteractionLogger  # requests and answers of the keys and tenants that opt in
    heartbeat: Heartbeat  # this process in the store's processes, and the keys it holds
    # Traces over OTLP, when `[tracing] otlp_endpoint` is set; None costs nothing.
    tracing: Tracing | None = None

    @classmethod
    async def start(cls, data_dir: Path, config: Config) -> Hub:
        env = dict(os.environ)
        for problem in missing_secrets(config, env):
            log.warning("%s: its requests will fail until it is set", problem)
        identity = NodeIdentity.load(data_dir / IDENTITY_FILE)
        store = await open_store(**store_target(data_dir, config)._asdict())
        usage = UsageRecorder(store, Journal(data_dir / JOURNAL_DIR))
        keys = KeyCache(identity.derive_secret(HASH_PURPOSE), store, data_dir, usage.audit)
        budgets = Budgets(store, config.node.currency)
        keys.listeners.append(budgets.forget)
        await keys.load()
        client = http_client(config)
        alerts = BudgetAlerts(config.alerts, store, client, config.node.name, usage.audit)
        usage.listeners.append(alerts.on_settled)
        usage.start()
        upstreams = UpstreamClient(max_connections=config.upstream.max_connections)
        router = build_router(config, upstreams, env)
        router.board = CooldownBoard.open(data_dir)  # None unless `serve` runs several workers
        peering = Peering(
            config, identity, store, client, upstreams, router, data_dir, keys.mark_stale
        )
        await peering.start()
        heartbeat = Heartbeat(store, keys, budgets.holder, data_dir)
        await heartbeat.beat()  # live, and trusting its keys, before the first request
        # Keys and peers changed by another process on another host (PostgreSQL): the file
        # epochs above only tell the processes that share this data folder.
        await store.watch(lambda changed: _stale(changed, heartbeat, peering))
        receipts = Receipts(identity, store, client, peering)
        limiter = RateLimiter(store)
        scheduler = _schedule(peering, receipts, config)
        resync = ChainResync(store, identity, client, peering)
        await resync.load()
        scheduler.add_job(resync.all, id="ledger.resync")  # at start, off the request path
        _schedule_limits(scheduler, store, limiter)
        scheduler.add_job(
            _while_store_answers(heartbeat.beat),
            "interval",
            seconds=HEARTBEAT_SECONDS,
            max_instances=1,
            coalesce=True,
            id="processes.beat",
        )
        scheduler.add_job(
            _while_store_answers(adopt_orphans),
            "interval",
            args=(store, data_dir / JOURNAL_DIR),
            seconds=ORPHANS_INTERVAL,
            max_instances=1,
            coalesce=True,
            id="journal.orphans",
        )
        scheduler.add_job(
            _while_store_answers(budgets.renew),
            "interval",
            seconds=HOLD_RENEW_INTERVAL,
            max_instances=1,
            coalesce=True,
            id="budgets.renew",
        )
        metrics = Metrics()
        guardrails = Guardrails(
            config.guardrails,
            metrics.registry,
            usage.audit,
            client,
            lambda name: router.by_name[name][0].adapter.upstream,  # moderation deployments
        )
        rewriter = guardrails.rewriter if guardrails.profiles else None
        cache = ResponseCache(store.cache, config.cache, metrics, rewriter)
        scheduler.add_job(
            _while_store_answers(_once_a_turn(store, cache.prune, CACHE_PRUNE_INTERVAL)),
            "interval",
            seconds=CACHE_PRUNE_INTERVAL,
            max_instances=1,
            coalesce=True,
            id="cache.prune",
        )
        logs = InteractionLogger(store.logs, config.interaction_logs)
        scheduler.add_job(
            _while_store_answers(
                _once_a_turn(store, logs.prune, config.interaction_logs.prune_interval)
            ),
            "interval",
            seconds=config.interaction_logs.prune_interval,
            max_instances=1,
            coalesce=True,
            id="logs.prune",
        )
        return cls(
            config=config,
            data_dir=data_dir,
            identity=identity,
            store=store,
            keys=keys,
            router=router,
            client=client,
            upstreams=upstreams,
            usage=usage,
            budgets=budgets,
            alerts=alerts,
            limiter=limiter,
            metrics=metrics,
            nonces=NonceCache(),
            nonce_claims=NonceClaims(store),
            peering=peering,
            receipts=receipts,
            resync=resync,
            scheduler=scheduler,
            started_at=int(time.time()),
            guardrails=guardrails,
            cache=cache,
            logs=logs,
            heartbeat=heartbeat,
            tracing=start_tracing(config, identity.node_id),
        )

    async def stop(self) -> None:
        await stop_scheduler(self.scheduler)
        await self.receipts.settle_tasks()
        await self.nonce_claims.settle()
        await self.cache.settle()
        await self.logs.flush()
        await self.usage.stop()
        await self.budgets.release()  # after the last settlement is written
        await self.limiter.stop()
        await self.alerts.stop()
        try:
            await self.heartbeat.leave()
        except StoreUnavailable as exc:  # it is forgotten once its heartbeat is stale
            log.warning("could not say this process stops: %s", exc)
        await self.client.aclose()
        await self.upstreams.aclose()
        await self.store.close()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)  # what is batched is sent


def _schedule(peering: Peering, receipts: Receipts, config: Config) -> AsyncIOScheduler:
    """The node's periodic work: peers' adverts and health (each peer on its own jittered
    schedule, looked at each second), and noticing peers that the CLI added or revoked
    (through the epoch file) within a second."""
    scheduler = AsyncIOScheduler()
    federation = config.federation
    scheduler.add_job(
        _while_store_answers(peering.refresh_all),
        "interval",
        seconds=REFRESH_TICK,  # each peer on its own jittered schedule (`Peering.refresh_all`)
        max_instances=1,
        coalesce=True,
        id="peers.refresh",
    )
    scheduler.add_job(
        _while_store_answers(peering.reload_if_stale),
        "interval",
        seconds=1,
        max_instances=1,
        coalesce=True,
        id="peers.reload",
    )
    scheduler.add_job(
        # Once a turn for the whole node: every worker sending the same batches had each
        # provider check each countersignature once per worker.
        _while_store_answers(
            _once_a_turn(receipts.store, receipts.send_countersignatures, COUNTERSIGN_INTERVAL)
        ),
        "interval",
        seconds=COUNTERSIGN_INTERVAL,
        max_instances=1,
        coalesce=True,
        id="ledger.countersign",
    )
    scheduler.add_job(
        _while_store_answers(
            _once_a_turn(receipts.store, _reconcile, federation.reconcile_interval)
        ),
        "interval",
        args=(receipts, peering),
        seconds=federation.reconcile_interval,
        max_instances=1,
        coalesce=True,
        id="ledger.reconcile",
    )
    # At start (models may have changed with the config), then as the schedule says.
    scheduler.add_job(peering.push_adverts, id="peers.push")
    scheduler.start()
    return scheduler


def _schedule_limits(scheduler: AsyncIOScheduler, store: Store, limiter: RateLimiter) -> None:
    """Rate-limit leases synced each second (unused requests and idle parallel slots given
    back, tokens counted, slots renewed), and the store's nonce and rate records of the past
    forgotten, off the request path."""
    scheduler.add_job(
        _while_store_answers(limiter.sync),
        "interval",
        seconds=1,
        max_instances=1,
        coalesce=True,
        id="limits.sync",
    )
    scheduler.add_job(
        _while_store_answers(_once_a_turn(store, _prune, PRUNE_INTERVAL)),
        "interval",
        args=(store,),
        seconds=PRUNE_INTERVAL,
        max_instances=1,
        coalesce=True,
        id="store.prune",
    )


async def stop_scheduler(scheduler: AsyncIOScheduler) -> None:
    """Stop the periodic work. The scheduler's shutdown cancels the jobs still running, which
    end quietly inside `_while_store_answers`; but a job it has just handed to the loop as a
    task has not begun, and cancelled before its first step it never reaches that wrapper:
    the scheduler logs the cancellation as the job's failure, with a traceback, on a clean
    stop. Paused first (nothing new is handed over), one turn of the loop lets those begin."""
    scheduler.pause()
    await asyncio.sleep(0)
    scheduler.shutdown(wait=False)


def _while_store_answers(job: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """A scheduled job that skips its turn while the database cannot be reached (it runs
    again on its schedule), with a warning instead of a traceback each time. A job still
    running when the node stops is cancelled by the scheduler's shutdown: it ends quietly
    (the scheduler would log the cancellation as a failure with its traceback)."""

    @functools.wraps(job)
    async def run(*args: object) -> None:
        try:
            await job(*args)
        except StoreUnavailable as exc:
            log.warning("%s skipped: %s", getattr(job, "__qualname__", job), exc)
        except asyncio.CancelledError:
            log.debug("%s stopped with the node", getattr(job, "__qualname__", job))

    return run


def _stale(changed: str, heartbeat: Heartbeat, peering: Peering) -> None:
    """Another process changed keys (or tenants), or peers: reload them."""
    if changed == "keys":
        heartbeat.heard()
    elif changed == "peers":
        peering.mark_stale()


def _once_a_turn(
    store: Store, job: Callable[..., Awaitable[None]], seconds: float
) -> Callable[..., Awaitable[None]]:
    """A job every process of the node schedules (each worker, each host), done by one of them
    in each `seconds` of the clock: the first to claim the turn in `store`. Node-wide work,
    reconciling the books with every peer or pruning the database, was done once per worker:
    each peer asked as many times, and the same refusals logged again. Two turns may come
    close together where two processes' schedules straddle a turn's end: at most twice in
    `seconds`, never more (`ours_this_turn`)."""
    name = str(getattr(job, "__qualname__", job))

    @functools.wraps(job)
    async def run(*args: object) -> None:
        if await ours_this_turn(store, name, seconds):
            await job(*args)

    return run


async def _prune(store: Store) -> None:
    await store.prune(int(time.time()))


async def _reconcile(receipts: Receipts, peering: Peering) -> None:
    reports = await reconcile_all(receipts.store, receipts.identity, receipts.client, receipts.keep)
    if any(report.suspended for report in reports):
        await peering.changed()  # a peer that equivocated stops being routed to at once


# Where the app's edge puts the hub in each request's scope (node/ingress/edge.py).
HUB_KEY = "aihub.hub"


def hub_of(request: Request) -> Hub:
    """The node's hub, from the request's scope: one dict lookup, where `request.app.state.hub`
    is three Python calls, and a hot request asks five times."""
    hub = request.scope.get(HUB_KEY)  # type: ignore[call-overload]
    return hub if hub is not None else request.app.state.hub
