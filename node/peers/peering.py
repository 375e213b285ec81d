"""The node as a peer: its peers and their adverts, routes to their models, joins (both
sides), and the periodic work that keeps adverts and health fresh.

Trust comes only from an invite (or an approved join request): once joined, each side pins the
other's node key, and only requests signed by that key, carrying the cross-node key issued to
that peer, are served. A peer that revoked us says so with a signed notice (posted to us, or in
its answer to our health check); once it checks out, the peer is no longer listed or routed,
and its models' names are kept to tell clients why (`take_revocation`, `Router.revoked_by`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec

from adapters.http import UpstreamClient
from federation.adverts import AdvertBook, AdvertModel, ModelAdvert, make_advert, verify_advert
from federation.descriptors import NodeDescriptor, make_descriptor, verify_descriptor
from federation.identity import NodeIdentity
from federation.invites import InviteRecord, JoinRequest, join_nonce, verify_join_request
from federation.printable import printable
from federation.revocations import NOTICE_FIELD, verify_revocation
from federation.sealing import seal_for, unseal
from federation.transport import LISTED_HEADER, signed_headers
from ledger.nesting import NestingError, bounded
from ledger.records import RecordError
from node.config import Config, Deployment
from node.errors import HubError, Kind
from node.gateway.auth import EPOCH_FILE, read_epoch, touch_epoch
from node.gateway.keys import HASH_PURPOSE, generate_key, hash_key, key_id_of
from node.gateway.policy import Limits, model_allowed
from node.gateway.router import Route, Router
from node.peers import audit
from node.peers.adapter import PeerAdapter, peer_upstream
from node.peers.address import advertised_urls
from node.storage.base import Store
from node.storage.records import JoinRequestBounds, KeyRecord, PeerRecord
from node.turns import ours_this_turn

log = logging.getLogger("aihub.peering")

PEERS_EPOCH_FILE = "peers.epoch"
PEER_TIMEOUT = 10.0
ADVERT_SEQ = "advert_seq"
# A peer's status here once it told us (signed) that it revoked our access.
REVOKED_BY_PEER = "revoked_by_peer"
# Each peer's health check (its advert fetch) comes round after the health interval times a
# factor drawn in this range, and its first one at a random point of the first interval: many
# peers checked from one node (and many nodes checking one peer) do not line up into bursts.
JITTER = (0.75, 1.25)
# How often `refresh_all` looks for peers whose check is due (seconds): the scheduler's tick.
REFRESH_TICK = 1
# A join request sent in the last quarter hour is asked after this often (seconds), so that
# the other admin's approval takes effect within seconds; an older one at the health
# interval (a request may wait for days, and each asking is a request to that node).
JOIN_POLL_SECONDS = 3
JOIN_POLL_FRESH = 900


class JoinResponse(msgspec.Struct):
    """What the issuer answers a successful join with."""

    v: int
    descriptor: dict
    sealed_key: str
    advert: dict | None = None


class JoinRefused(HubError):
    """A join (with or without an invite) that is not let through."""

    def __init__(self, kind: Kind, message: str) -> None:
        if kind is Kind.RATE_LIMITED:  # too many joins wait for approval: ask again later
            super().__init__(kind, message, code="too_many_join_requests", retry_after=60)
        else:
            super().__init__(kind, message, code="join_refused")


@dataclass
class Peer:
    """A peer at run time."""

    record: PeerRecord
    descriptor: NodeDescriptor
    key: str | None  # the cross-node key it issued us, unsealed
    advert: ModelAdvert | None = None
    healthy: bool = True
    latency: float | None = None
    last_seen: float | None = None
    failures: int = 0
    next_check: float = field(default=0.0)
    # A request of ours could not reach it: its next check is this process's own, whatever
    # another process found (`Peering._unless_checked_by_another`).
    unreached: bool = False

    @property
    def node_id(self) -> str:
        return self.record.node_id

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def url(self) -> str:
        return self.descriptor.urls[0]


class Peering:
    def __init__(
        self,
        config: Config,
        identity: NodeIdentity,
        store: Store,
        client: httpx.AsyncClient,
        upstreams: UpstreamClient,
        router: Router,
        directory: Path,
        on_keys_changed: Callable[[], None],
    ) -> None:
        self.config = config
        self.identity = identity
        self.store = store
        self.client = client  # for federation requests (adverts, joins, health)
        self.upstreams = upstreams  # for requests routed to peers, like any upstream
        self.router = router
        self.directory = directory
        self.on_keys_changed = on_keys_changed
        self.peers: dict[str, Peer] = {}
        self.book = AdvertBook()
        self.advert_seq = 0
        self._descriptor: NodeDescriptor | None = None
        self._epoch = -1
        # Peers that revoked our access (told us so, signed): no longer routed, still named.
        self.revoked_us: dict[str, PeerRecord] = {}
        self._checks: dict[str, asyncio.Lock] = {}
        self._loading = asyncio.Lock()
        self._saving: set[asyncio.Task[None]] = set()
        # What each peer was last told it may use here, and the keys epoch it was read at:
        # a change to a peer's key (its model list) bumps the advert and pushes it.
        self._offered: dict[str, list[AdvertModel]] = {}
        self._keys_epoch = -1
        self._next_poll = 0.0  # when `refresh_all` next asks after our join requests
        self._newest_request: int | None = None  # when the newest of them was sent (unix s)

    # --- our own objects -------------------------------------------------------------------

    def descriptor(self) -> NodeDescriptor:
        now = time.time()
        if self._descriptor is None or self._descriptor.exp - now < 86400:
            urls = advertised_urls(self.config, self.directory)
            self._descriptor = make_descriptor(self.identity, self.config.node.name, urls)
        return self._descriptor

    async def start(self) -> None:
        # A new seq at every start: the models may have changed with the config. Never below
        # the clock: a database restored from a backup holds an older counter, and peers
        # ignore an advert whose seq is not above the last one they saw.
        await self._next_seq()
        await self.load()
        await self._offers_changed()  # what each peer is told at start, the base of changes

    async def _next_seq(self) -> None:
        """A new advert seq: the clock's second, or above every seq this node issued before,
        in any process and before any restart (the store's counter holds the last one). A
        node restarted within the second of its last seq had issued the same seq again,
        which its peers refused as not newer: they kept the old advert until their next
        refresh, an hour later by default."""
        counter = await self.store.peers.next_counter(ADVERT_SEQ, int(time.time()))
        self.advert_seq = max(counter, self.advert_seq + 1)

    async def newest_seq(self) -> int:
        """The node's newest advert seq, taken up: another process of the node (a worker, a
        host) may have issued one after ours (each takes one at its start, and when offers
        change) and priced receipts under it. A consumer that holds an older advert fetches
        ours before it refuses such a receipt; answered by a worker still on an older seq,
        it refused it (a third of a hop's receipts under two workers)."""
        self.advert_seq = max(self.advert_seq, await self.store.peers.counter(ADVERT_SEQ))
        return self.advert_seq

    def _cheapest(self, name: str) -> Deployment | None:
        """The local deployment of `name` whose price is shown to peers: the cheapest (the
        first of equals, in the config's order)."""
        specs = (route.spec for route in self.router.by_name.get(name, ()))
        return min(specs, key=lambda spec: spec.price_in + spec.price_out, default=None)

    def advertised_price(self, name: str) -> tuple[int, int]:
        """The prices a peer is shown (and charged) for model `name`, per 1M tokens in and
        out: on a peer's request path, so one name's deployments are looked at, not all."""
        spec = self._cheapest(name)
        return (spec.price_in, spec.price_out) if spec is not None else (0, 0)

    def local_models(self, limits: Limits | None) -> list[AdvertModel]:
        """What a peer's key may use here: local deployments only, cheapest price per name."""
        chosen = [
            spec
            for name in self.router.by_name
            if limits is None or model_allowed(limits.models, name)
            if (spec := self._cheapest(name)) is not None
            # Adverts carry chat and embeddings (`federation/adverts.py`): others stay local.
            if spec.kind in ("chat", "embeddings")
        ]
        return [
            AdvertModel(
                id=spec.name,
                kind=spec.kind,
                context=spec.context,
                price_in=spec.price_in,
                price_out=spec.price_out,
                stream=spec.kind == "chat",
            )
            for spec in chosen
        ]

    def advert_for(self, limits: Limits | None) -> ModelAdvert:
        return make_advert(
            self.identity,
            self.advert_seq,
            self.local_models(limits),
            self.config.federation.advert_ttl,
        )

    # --- loading peers ---------------------------------------------------------------------

    def stale(self) -> bool:
        return read_epoch(self.directory / PEERS_EPOCH_FILE) != self._epoch

    async def catch_up(self) -> bool:
        """Reload now if another process changed peers (one `stat`), rather than at the next
        second's look: whether anything was reloaded. For a request about to be refused for
        a model this process does not know, which a join or an advert another process took
        just now may have brought (`aihub join` said it is available)."""
        if not self.stale():
            return False
        async with self._loading:  # many such requests at once: one reload
            if self.stale():
                await self.load()
        return True

    def mark_stale(self) -> None:
        """Reload within a second (another process, perhaps on another host, changed peers)."""
        self._epoch = -1

    async def load(self) -> None:
        self._epoch = read_epoch(self.directory / PEERS_EPOCH_FILE)
        peers: dict[str, Peer] = {}
        records = await self.store.peers.peers()
        self.revoked_us = {r.node_id: r for r in records if r.status == REVOKED_BY_PEER}
        requested = [r.created_at for r in records if r.status == "requested"]
        self._newest_request = max(requested, default=None)
        self._next_poll = min(self._next_poll, time.monotonic() + self._poll_interval())
        for record in records:
            if record.status != "active":
                continue
            # Verified when it arrived; an old descriptor still says where the peer is.
            descriptor = msgspec.json.decode(record.descriptor, type=NodeDescriptor)
            if descriptor.node_id != record.node_id:
                log.warning("peer %s: stored descriptor is another node's", record.node_id)
                continue
            key = None
            if record.key_from_them:
                key = unseal(self.identity, record.key_from_them).decode()
            peer = Peer(record, descriptor, key)
            old = self.peers.get(record.node_id)
            if old is not None:
                peer.healthy, peer.latency, peer.last_seen = old.healthy, old.latency, old.last_seen
                peer.failures, peer.next_check = old.failures, old.next_check
                peer.unreached = old.unreached
            else:
                interval = self.config.federation.health_interval
                peer.next_check = time.monotonic() + random.uniform(0, interval)
            if record.advert:
                with contextlib.suppress(RecordError):
                    advert = verify_advert(record.advert.encode(), pinned_node_id=record.node_id)
                    self.book.accept(advert)
            peer.advert = self.book.current(record.node_id, time.time())
            peers[record.node_id] = peer
        self.peers = peers
        self.rebuild_routes()

    def rebuild_routes(self) -> None:
        routes: list[Route] = []
        for peer in self.peers.values():
            if peer.key is None or peer.advert is None:
                continue
            for model in peer.advert.models:
                if not _nameable(model.id):
                    continue
                spec = Deployment(
                    name=model.id,
                    provider="peer",
                    kind=model.kind,
                    price_in=model.price_in,
                    price_out=model.price_out,
                    context=model.context,
                )
                upstream = peer_upstream(model.id, peer.url, peer.key, self.config.upstream)
                adapter = PeerAdapter(
                    upstream,
                    self.upstreams,
                    self.identity,
                    peer.name,
                    self._confirmer(peer),
                    lambda node_id=peer.node_id: self.answered(node_id),
                    lambda node_id=peer.node_id: self.unreachable(node_id),
                )
                routes.append(
                    Route(spec, adapter, -1, peer.node_id, peer.name, price_seq=peer.advert.seq)
                )
        self.router.set_peer_routes(routes, self._revoked_models())

    def _revoked_models(self) -> dict[str, str]:
        """Each model name or `model@peer` that only a peer which revoked us served, and
        that peer's name: its clients are told why it is gone."""
        gone: dict[str, str] = {}
        for record in self.revoked_us.values():
            gone[f"@{record.name}"] = record.name
            gone[f"@{record.node_id}"] = record.name
            if record.advert:
                with contextlib.suppress(msgspec.DecodeError, TypeError, AttributeError):
                    for model in msgspec.json.decode(record.advert).get("models", []):
                        gone.setdefault(str(model["id"]), record.name)
        return gone

    def _confirmer(self, peer: Peer) -> Callable[[], Awaitable[bool]]:
        """For the peer's routes: whether a refusal of our key means the peer revoked us."""
        return lambda: self.confirm_revoked(peer.node_id)

    def answered(self, node_id: str) -> None:
        """A peer answered a request: it is up. Recorded (off the request path) only when
        that changes what its last health check said, so `peers list` does not show a peer
        `down` that just served requests, nor back off from it."""
        peer = self.peers.get(node_id)
        if peer is None or peer.healthy:
            return
        peer.healthy, peer.failures, peer.next_check = True, 0, 0.0
        peer.last_seen = time.time()
        latency = None if peer.latency is None else round(peer.latency * 1000)
        task = asyncio.get_running_loop().create_task(
            self.store.peers.save_peer_health(node_id, True, latency, int(peer.last_seen))
        )
        self._saving.add(task)
        task.add_done_callback(self._saving.discard)

    def unreachable(self, node_id: str) -> None:
        """A request could not reach the peer: check its health at the next tick rather than
        at its next turn (the check, signed and answered, is what marks it down; once it is
        down its backoff decides, so failing requests do not add checks)."""
        peer = self.peers.get(node_id)
        if peer is not None and peer.healthy:
            peer.next_check, peer.unreached = 0.0, True

    async def confirm_revoked(self, node_id: str) -> bool:
        """A peer refused our key: ask it (a signed health check, whose answer to a node it
        cut off carries a signed notice) rather than believe an unsigned status. One check
        at a time per peer: the requests that failed together wait for the same answer."""
        lock = self._checks.setdefault(node_id, asyncio.Lock())
        async with lock:
            peer = self.peers.get(node_id)
            if peer is not None and node_id not in self.revoked_us:
                await self.refresh_advert(peer)
        return node_id in self.revoked_us

    async def take_revocation(self, node_id: str, notice: bytes | dict) -> bool:
        """A peer's notice that it revoked us (posted to us, or in its answer to our health
        check): acted on only if it checks out (`federation.revocations`). The peer then
        stops being listed and routed at once, and shows as `revoked_by_peer`."""
        peer = self.peers.get(node_id)
        if peer is None or peer.key is None:
            return False
        key_id = key_id_of(peer.key)
        try:
            verify_revocation(notice, issuer=node_id, me=self.identity.node_id, key_id=key_id or "")
        except RecordError as exc:
            log.warning("revocation notice from %s refused: %s", peer.name, exc)
            return False
        await self.store.peers.revoke_peer(node_id, int(time.time()), status=REVOKED_BY_PEER)
        await audit.record(self.store, node_id, "peer.revoked_us", node_id, name=peer.name)
        log.warning("peer %s revoked this node's access", peer.name)
        self.book.forget(node_id)
        await self.changed()
        return True

    def touch(self) -> None:
        """Tell every process serving this node that keys and peers changed."""
        touch_epoch(self.directory)
        touch_epoch(self.directory, PEERS_EPOCH_FILE)

    # --- the issuer's side of a join -------------------------------------------------------

    async def accept_join(self, body: bytes, signer: str) -> JoinResponse:
        """Check a join request (as received: its signatures are checked on these very
        bytes) against the stored invite; issue and seal the peer's key."""
        try:
            request = msgspec.json.decode(body, type=JoinRequest)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            raise JoinRefused(Kind.INVALID_REQUEST, f"invalid join request: {exc}") from exc
        invite = await self.store.peers.invite(request.token_id)
        if invite is None:
            raise JoinRefused(Kind.NOT_FOUND, "unknown invite")
        record = InviteRecord(
            token_id=invite.token_id,
            invite_public_key=invite.public_key,
            exp=invite.exp,
            uses=invite.uses_left,
            models=invite.models,
            cap_micros=invite.cap_micros,
            cap_period=invite.cap_period,  # type: ignore[arg-type]
        )
        try:
            joiner = verify_join_request(body, record, self.identity.node_id)
        except RecordError as exc:
            raise JoinRefused(Kind.REFUSED, f"join refused: {exc}") from exc
        self._check_joiner(joiner, signer)
        # Before anything is issued: a join that is let through again would revoke the key
        # the first one issued (a peer that joins again gets a fresh key).
        if not await self.store.peers.claim_nonce(*join_nonce(request), int(time.time())):
            raise JoinRefused(Kind.REFUSED, "join refused: this join proof was already used")
        limits = Limits(
            models=invite.models or None,
            budget_micros=invite.cap_micros,
            budget_period=invite.cap_period,  # type: ignore[arg-type]
        )
        key = await admit_peer(self.store, self.identity, joiner, limits, invite.token_id)
        if key is None:
            raise JoinRefused(Kind.GONE, "this invite is used up or expired")
        await audit.record(
            self.store,
            joiner.node_id,
            "peer.joined",
            joiner.node_id,
            name=joiner.name,
            invite=invite.token_id,
        )
        await self.changed()
        await self.newest_seq()
        return self.join_response(joiner.node_id, key, limits)

    def _check_joiner(self, joiner: NodeDescriptor, signer: str) -> None:
        """The node joining is the one that signed the request, and not this node."""
        if joiner.node_id != signer:
            raise JoinRefused(Kind.REFUSED, "the join request is not signed by the joining node")
        if joiner.node_id == self.identity.node_id:
            raise JoinRefused(Kind.INVALID_REQUEST, "a node cannot join itself")

    def join_response(self, node_id: str, key: str, limits: Limits) -> JoinResponse:
        # What the joiner is told here is what a later `keys update` is compared with: a peer
        # first seen by `_offers_changed` after that update would be pushed nothing.
        self._offered[node_id] = self.local_models(limits)
        return JoinResponse(
            v=1,
            descriptor=msgspec.to_builtins(self.descriptor()),
            sealed_key=seal_for(node_id, key.encode()),
            advert=msgspec.to_builtins(self.advert_for(limits)),
        )

    async def take_join_request(
        self, body: bytes, signer: str, source: str = ""
    ) -> JoinResponse | None:
        """A join request without an invite: its answer if the admin approved it, else None
        (it waits in `aihub peers pending`). Asking again is how the joiner learns the
        answer. `source` is the address it came from: one address holds only a few of the
        pending places."""
        try:
            joiner = verify_descriptor(body)
        except RecordError as exc:
            raise JoinRefused(Kind.INVALID_REQUEST, f"invalid join request: {exc}") from exc
        self._check_joiner(joiner, signer)
        peer = await self.store.peers.peer(joiner.node_id)
        if peer is not None and peer.status == "revoked":
            raise JoinRefused(Kind.REFUSED, "this node was revoked here")
        answer = await self.store.peers.join_answer(joiner.node_id)
        if answer is not None:
            return msgspec.json.decode(answer, type=JoinResponse)
        federation = self.config.federation
        bounds = JoinRequestBounds(
            source=source,
            per_source=federation.max_join_requests_per_source,
            total=federation.max_join_requests,
            ttl=federation.join_request_ttl,
        )
        refused = await self.store.peers.add_join_request(
            joiner.node_id, body.decode(), int(time.time()), bounds
        )
        if refused == "source":
            raise JoinRefused(
                Kind.RATE_LIMITED, "too many join requests from this address wait for approval"
            )
        if refused == "total":
            raise JoinRefused(
                Kind.RATE_LIMITED, "too many join requests wait for approval; ask again later"
            )
        return None

    async def changed(self) -> None:
        """Peers or their keys changed here: tell every process serving this node."""
        self.touch()
        self.on_keys_changed()
        await self.load()

    # --- the consumer's side: adverts and health -------------------------------------------

    async def signed(
        self, method: str, url: str, key: str | None, body: bytes = b""
    ) -> httpx.Response:
        return await signed_request(
            self.client, self.identity, method, url, key, body, listed=self.config.federation.listed
        )

    async def refresh_advert(self, peer: Peer) -> bool:
        """Fetch and verify the peer's advert for us; keep it if its seq is newer. This is
        also the peer's health check."""
        started = time.perf_counter()
        try:
            response = await self.signed("GET", peer.url + "/federation/advert", peer.key)
        except httpx.HTTPError as exc:
            await self._unhealthy(peer, f"unreachable: {type(exc).__name__}")
            return False
        if response.status_code == 401 and await self._revoked_answer(peer, response):
            return False
        if response.status_code != 200:
            await self._unhealthy(peer, f"it answered {response.status_code}")
            return False
        await self._healthy(peer, time.perf_counter() - started)
        return await self.take_advert(peer.node_id, response.content)

    async def _revoked_answer(self, peer: Peer, response: httpx.Response) -> bool:
        """Whether a refusal carries a notice that the peer revoked us (and it checked out)."""
        try:
            fields = msgspec.json.decode(bounded(response.content))
        except (msgspec.DecodeError, NestingError, UnicodeDecodeError):
            return False
        notice = fields.get(NOTICE_FIELD) if isinstance(fields, dict) else None
        return isinstance(notice, dict) and await self.take_revocation(peer.node_id, notice)

    async def take_advert(self, node_id: str, data: bytes) -> bool:
        """A signed advert from a peer (fetched or pushed): keep it if valid and newer."""
        peer = self.peers.get(node_id)
        if peer is None:
            return False
        try:
            advert = verify_advert(data, pinned_node_id=node_id)
        except RecordError as exc:
            log.warning("advert from %s refused: %s", peer.name, exc)
            return False
        # Signed by the peer just now (a push at its start, or our fetch): it is up, whatever
        # its last check said; a peer back from a restart need not wait out our backoff.
        self.answered(node_id)
        if not self.book.accept(advert):
            return False
        peer.advert = advert
        record = msgspec.structs.replace(peer.record, advert=data.decode())
        await self.store.peers.save_peer(record)
        peer.record = record
        self.rebuild_routes()
        # The other processes serving this folder take it up within a second, not at their
        # own next check of the peer (30 s): a push reaches one worker. (Other hosts hear of
        # the saved peer from the database.)
        touch_epoch(self.directory, PEERS_EPOCH_FILE)
        return True

    async def note_listing(self, node_id: str, listed: bool) -> None:
        """A peer said whether it wants to be named to our other peers (peer exchange)."""
        peer = self.peers.get(node_id)
        if peer is None or peer.record.listed == listed:
            return
        peer.record = msgspec.structs.replace(peer.record, listed=listed)
        await self.store.peers.save_peer(peer.record)

    def listed_descriptors(self, asking: str) -> list[dict[str, object]]:
        """What we tell a peer in peer exchange: the signed descriptors of our other peers
        that chose to be listed, exactly as they signed them."""
        return [
            msgspec.json.decode(peer.record.descriptor)
            for peer in self.peers.values()
            if peer.record.listed and peer.node_id != asking
        ]

    async def _healthy(self, peer: Peer, seconds: float) -> None:
        peer.healthy, peer.failures, peer.last_seen = True, 0, time.time()
        peer.unreached = False
        peer.latency = seconds if peer.latency is None else peer.latency * 0.7 + seconds * 0.3
        peer.next_check = time.monotonic() + self._jittered(self.config.federation.health_interval)
        await self.store.peers.save_peer_health(
            peer.node_id, True, round(peer.latency * 1000), int(time.time())
        )

    async def _unhealthy(self, peer: Peer, reason: str) -> None:
        peer.healthy, peer.unreached = False, False
        peer.failures += 1
        # Back off exponentially from a failing peer: 2, 4, 8 … seconds, at most 5 minutes.
        peer.next_check = time.monotonic() + self._jittered(min(2**peer.failures, 300))
        log.info("peer %s failed its health check (%s)", peer.name, reason)
        await self.store.peers.save_peer_health(peer.node_id, False, None, int(time.time()))

    async def reload_if_stale(self) -> None:
        if self.stale():
            await self.load()
        if await self._offers_changed():
            # One seq for all peers: each is told (a peer whose offer did not change learns
            # the new seq now rather than from a receipt priced under it).
            await self._next_seq()
            await self.push_adverts()

    async def _offers_changed(self) -> bool:
        """Whether what some peer may use here changed since it was last told (a key's
        model list, after `keys update`, or a peer's key revoked). Read only when keys
        changed (the keys epoch): one `stat` a second otherwise."""
        epoch = read_epoch(self.directory / EPOCH_FILE)
        if epoch == self._keys_epoch:
            return False
        self._keys_epoch = epoch
        offered: dict[str, list[AdvertModel]] = {}
        for peer in list(self.peers.values()):
            if peer.record.key_for_them is None:
                continue
            issued = await self.store.keys.key(peer.record.key_for_them)
            if issued is not None and issued.revoked_at is None:
                offered[peer.node_id] = self.local_models(issued.limits)
        changed = any(
            node_id in self._offered and self._offered[node_id] != models
            for node_id, models in offered.items()
        )
        # Merged, not replaced: a peer that joined while this ran keeps what its join told it.
        self._offered.update(offered)
        return changed

    @staticmethod
    def _jittered(seconds: float) -> float:
        return seconds * random.uniform(*JITTER)

    async def refresh_all(self) -> None:
        """Each tick (`REFRESH_TICK`): check the peers whose check is due (each on its own
        jittered schedule), and once a health interval ask after our join requests."""
        now = time.monotonic()
        due = [p for p in self.peers.values() if p.key is not None and p.next_check <= now]
        if due:
            due = await self._unless_checked_by_another(due, now)
        await asyncio.gather(*(self.refresh_advert(peer) for peer in due))
        if now >= self._next_poll and self._newest_request is not None:
            interval = self._poll_interval()
            self._next_poll = now + interval
            # Once a turn for the node: each asking is a request to the other node, and
            # every process polled on its own.
            if await ours_this_turn(self.store, "join-poll", interval):
                await self.poll_join_requests()

    async def _unless_checked_by_another(self, due: list[Peer], now: float) -> list[Peer]:
        """Of the peers due a check, those that no other process of the node found up since
        our last look and within most of an interval: each of the others takes that finding
        (the store's `peer_health`) and comes back when its interval from then is up. With
        one worker per core, every worker checked every peer: each peer was asked as many
        times. A peer this process found down, or could not reach with a request, it checks
        itself (on its own backoff): another's "up" does not hide what it saw. A newer advert
        that the check fetched reaches the others as a change of peers does."""
        interval = self.config.federation.health_interval
        found = await self.store.peers.peer_health()
        wall = time.time()
        left = []
        for peer in due:
            healthy, latency_ms, checked_at = found.get(peer.node_id, (False, None, 0))
            age = wall - checked_at
            # Ours to check: a peer this process could not reach or found down, or a finding
            # from a clock ahead of ours (another host's).
            ours = peer.unreached or peer.failures > 0 or not peer.healthy
            fresh = healthy and checked_at > (peer.last_seen or 0) and age >= 0
            if ours or not fresh or age >= interval * JITTER[0]:
                left.append(peer)
                continue
            peer.healthy, peer.failures, peer.last_seen = True, 0, float(checked_at)
            if latency_ms is not None:
                peer.latency = latency_ms / 1000
            peer.next_check = now + max(self._jittered(interval) - age, REFRESH_TICK)
        return left

    def _poll_interval(self) -> float:
        """How long until our join requests are asked after again (`JOIN_POLL_SECONDS`)."""
        newest = self._newest_request
        if newest is not None and time.time() - newest < JOIN_POLL_FRESH:
            return JOIN_POLL_SECONDS
        return self.config.federation.health_interval

    async def push_adverts(self) -> None:
        """Tell every peer we serve what it may use here now (at start: the models may have
        changed with the config; after a change to what a peer's key may use)."""
        await self.newest_seq()
        await asyncio.gather(*(self._push(peer) for peer in list(self.peers.values())))

    async def _push(self, peer: Peer) -> None:
        if peer.record.key_for_them is None:
            return
        issued = await self.store.keys.key(peer.record.key_for_them)
        if issued is None or issued.revoked_at is not None:
            return
        advert = msgspec.json.encode(self.advert_for(issued.limits))
        try:
            await self.signed("POST", peer.url + "/federation/advert", None, advert)
        except httpx.HTTPError as exc:
            log.info("could not push our advert to %s (%s)", peer.name, type(exc).__name__)

    async def poll_join_requests(self) -> None:
        """Ask the nodes we sent a join request to (without an invite) for their answer."""
        for record in await self.store.peers.peers():
            if record.status != "requested":
                continue
            outcome = await ask_to_join(
                self.store,
                self.identity,
                self.client,
                record,
                self.descriptor(),
                listed=self.config.federation.listed,
                stored=True,
            )
            if outcome == "joined":
                self.touch()
                await self.load()
                # The answer carries no advert: fetch it now rather than at the next check.
                peer = self.peers.get(record.node_id)
                if peer is not None:
                    await self.refresh_advert(peer)


async def admit_peer(
    store: Store,
    identity: NodeIdentity,
    joiner: NodeDescriptor,
    limits: Limits,
    token_id: str | None,
) -> str | None:
    """Issue `joiner` a cross-node key with `limits` and record it as a peer, spending one use
    of the invite `token_id` if there is one: the key, or None if the invite is used up."""
    key, key_id = generate_key()
    now = int(time.time())
    record = KeyRecord(
        id=key_id,
        name=f"peer:{joiner.name}",
        hash=hash_key(identity.derive_secret(HASH_PURPOSE), key),
        is_admin=False,
        created_at=now,
        limits=limits,
        peer_id=joiner.node_id,
    )
    existing = await store.peers.peer(joiner.node_id)
    peer = PeerRecord(
        node_id=joiner.node_id,
        name=joiner.name,
        descriptor=msgspec.json.encode(joiner).decode(),
        status="active",
        created_at=existing.created_at if existing else now,
        key_for_them=key_id,
    )
    if not await store.peers.accept_join(token_id, now, record, peer):
        return None
    return key


def joined_peer(identity: NodeIdentity, answer: bytes, issuer: str) -> PeerRecord:
    """The peer record for the issuer's answer to our join; RecordError if it is not valid.

    The key it sent is sealed to us; we keep it sealed at rest."""
    try:
        joined = msgspec.json.decode(bounded(answer), type=JoinResponse)
        descriptor = verify_descriptor(joined.descriptor, pinned=issuer)
        key = unseal(identity, joined.sealed_key)
        advert = None
        if joined.advert is not None:
            verify_advert(joined.advert, pinned_node_id=issuer)
            advert = msgspec.json.encode(joined.advert).decode()
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise RecordError(f"the answer to our join is not valid: {exc}") from exc
    return PeerRecord(
        node_id=descriptor.node_id,
        name=descriptor.name,
        descriptor=msgspec.json.encode(descriptor).decode(),
        status="active",
        created_at=int(time.time()),
        key_from_them=seal_for(identity.node_id, key),
        advert=advert,
    )


async def signed_request(
    client: httpx.AsyncClient,
    identity: NodeIdentity,
    method: str,
    url: str,
    key: str | None,
    body: bytes = b"",
    *,
    listed: bool = False,
    seconds: float = PEER_TIMEOUT,
) -> httpx.Response:
    """A request to another node, signed by ours (RFC 9421); with the key it issued us, if
    any. The listing header tells the peer whether we want to be named to its peers."""
    extra = {LISTED_HEADER: "1"} if listed else None
    headers = signed_headers(identity, method, url, body, key=key, extra=extra)
    return await client.request(method, url, content=body, headers=headers, timeout=seconds)


class _Refusal(msgspec.Struct):
    message: str = ""


class _Refused(msgspec.Struct):
    error: _Refusal


def refusal(response: httpx.Response) -> str:
    """What a node's refusal of a join says: its error's message, else the start of its body
    (either shown as text, never as markup or control characters)."""
    try:
        message = msgspec.json.decode(response.content[:4096], type=_Refused).error.message
    except (msgspec.DecodeError, msgspec.ValidationError):
        message = response.text[:300]
    return printable(message or response.text[:300])


async def ask_to_join(
    store: Store,
    identity: NodeIdentity,
    client: httpx.AsyncClient,
    issuer: PeerRecord,
    ours: NodeDescriptor,
    *,
    listed: bool,
    stored: bool = False,
) -> str:
    """Send (or send again) our join request to `issuer`, a node we have no invite from:
    "pending" until its admin approves, "joined" once the answer carries our key, or what
    went wrong. The outcome is stored, so the running node keeps asking (`stored`: the
    request is in the store already, as asked before; a "pending" again changes nothing,
    and is not written again: each write of a peer has every process reload its peers)."""
    descriptor = msgspec.json.decode(issuer.descriptor, type=NodeDescriptor)
    body = msgspec.json.encode(ours)
    problem = "no URL"
    for url in descriptor.urls:
        try:
            response = await signed_request(
                client,
                identity,
                "POST",
                url + "/federation/join-request",
                None,
                body,
                listed=listed,
            )
        except httpx.HTTPError as exc:
            problem = f"{url}: {type(exc).__name__}"
            continue
        if response.status_code == 202:
            if not (stored and issuer.status == "requested"):
                await store.peers.save_peer(msgspec.structs.replace(issuer, status="requested"))
            return "pending"
        if response.status_code != 200:
            return f"{url} refused ({response.status_code}): {refusal(response)}"
        try:
            record = joined_peer(identity, response.content, descriptor.node_id)
        except RecordError as exc:
            return str(exc)
        await store.peers.save_peer(msgspec.structs.replace(record, created_at=issuer.created_at))
        return "joined"
    return problem


def _nameable(model: str) -> bool:
    """Whether a peer's advertised model can be asked for: a name as our own models have
    (no `@`, which ends a model's name in `model@peer`, and no whitespace). An advert is the
    peer's word; a model it names otherwise is not routed, the rest of its advert is."""
    return "@" not in model and not any(c.isspace() for c in model)
