"""The response cache: an exact-match answer kept per tenant (or key), replayed for free.

A request the cache may answer gets a `CacheSlot`: its scope (the tenant's, else the key's:
never shared across tenants, and a peer's requests are never cached) and the SHA-256 of its
canonical form: the API surface, whether it streams, and every field of the client's body but
those that cannot change the answer (`NEUTRAL_FIELDS`), each value decoded and re-encoded by
msgspec with sorted keys, so that spacing and key order do not make two requests differ.

What is kept (`Kept`) is the typed result, or a stream's events (their tagged union encodes as
it is), as the client that asked first was sent them (after its key's output guardrails), with
the usage they reported: a hit is rendered by the ingress as if it came from the upstream, a
stream with its original event structure, and passes the asking key's own output checks. The
pipeline looks a slot up in `begin`, once the rate limits let the request through: a hit that
is not billed (`[cache] bill_hits` off) reserves nothing, so a spent budget still gets it.

It is on for a key whose limits say `cache = true`, else its tenant's, else for the models in
`[cache] models`; `Cache-Control: no-cache` (or `no-store`) or a body's `"cache": false`
bypasses it. Answers live in the node's store (`CacheStore`) with a TTL and an LRU bound on
their number, and the most recent in each process's memory in front of it. A store that fails
makes a miss, never a failed request.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import msgspec
from msgspec import Raw

from adapters.events import Event
from adapters.types import ChatCall, ChatResult, Usage
from node.config import CacheSection
from node.gateway.auth import Principal
from node.gateway.metrics import Metrics
from node.gateway.policy import model_allowed
from node.storage.base import CacheStore
from node.storage.records import CachedAnswer

log = logging.getLogger("aihub.cache")
# Answers being written to the store at once, at most (each holds up to `max_answer_bytes`).
MAX_WRITES = 64

# The body's own switch (OpenAI-style extension); taken out before the upstream sees the body.
BODY_FIELD = "cache"
# Fields that do not change the answer: how it is delivered, and who asks (the scope already
# says that), not what is asked.
NEUTRAL_FIELDS = frozenset({"stream", "stream_options", BODY_FIELD, "user", "metadata", "store"})
_BYPASS_DIRECTIVES = frozenset({"no-cache", "no-store"})


class CacheSlot(NamedTuple):
    """Where a request's answer is kept: its scope and the digest of its canonical form."""

    scope: str
    digest: bytes


class Kept(msgspec.Struct, omit_defaults=True):
    """A kept answer: a complete one's typed result, or a stream's events, and their usage."""

    usage: Usage
    usage_estimated: bool = False
    result: ChatResult | None = None
    events: list[Event] | None = None


_kept_decoder = msgspec.msgpack.Decoder(Kept)
_encoder = msgspec.msgpack.Encoder()


def header_bypass(cache_control: str) -> bool:
    """Whether a `Cache-Control` header asks for a fresh answer."""
    directives = {part.strip().split("=", 1)[0].lower() for part in cache_control.split(",")}
    return not directives.isdisjoint(_BYPASS_DIRECTIVES)


def body_bypass(value: Raw | None) -> bool:
    """Whether the body's `cache` field turns the cache off for this request (a ValueError
    if it is there and not a boolean)."""
    if value is None:
        return False
    try:
        wanted = msgspec.json.decode(value, type=bool)
    except msgspec.DecodeError:
        raise ValueError("`cache` must be true or false") from None
    return not wanted


def scope_of(principal: Principal) -> str:
    tenant = principal.key.tenant_id
    return f"tenant:{tenant}" if tenant is not None else f"key:{principal.key_id}"


def enabled_for(principal: Principal, model: str, config: CacheSection) -> bool:
    """The key's say, else its tenant's, else whether the config caches the model."""
    if principal.key.limits.cache is not None:
        return principal.key.limits.cache
    if principal.tenant is not None and principal.tenant.limits.cache is not None:
        return principal.tenant.limits.cache
    return bool(config.models) and model_allowed(config.models, model.partition("@")[0])


def canonical_digest(surface: str, raw: dict[str, Raw], stream: bool, rewrite: str = "") -> bytes:
    """The SHA-256 of the request's canonical form (the body decoded at the ingress under the
    nesting bound, so re-decoding it here is safe), and of the guardrail profile that rewrites
    it before the upstream sees it, if one does (`rewrite`: its name)."""
    fields = {
        name: msgspec.json.decode(value)
        for name, value in raw.items()
        if name not in NEUTRAL_FIELDS
    }
    form = {"surface": surface, "stream": stream, "body": fields}
    if rewrite:
        form["rewrite"] = rewrite
    canonical = msgspec.json.encode(form, order="sorted")
    return hashlib.sha256(canonical).digest()


def kept_result(result: ChatResult) -> Kept:
    """A complete answer as kept: without the serving peer's receipt (that was for one
    request, and is kept in the ledger)."""
    result = msgspec.structs.replace(result, receipt=None)
    return Kept(result.usage, result.usage_estimated, result=result)


def event_bytes(event: object) -> int:
    """What an event adds to a kept stream."""
    return len(_encoder.encode(event))


class ResponseCache:
    """The cache of one node process: its store's answers, the latest also in memory."""

    def __init__(
        self,
        store: CacheStore,
        config: CacheSection,
        metrics: Metrics,
        rewriter: Callable[[Principal], str] | None = None,
    ) -> None:
        self._store = store
        self.config = config
        self._metrics = metrics
        # The name of the guardrail profile that rewrites a caller's requests (redacts them)
        # before any upstream sees them, or "": the same body is another request under it.
        self._rewriter = rewriter
        self._memory: OrderedDict[CacheSlot, tuple[int, Kept]] = OrderedDict()
        self._writing: set[asyncio.Task[None]] = set()

    def slot(
        self,
        principal: Principal,
        surface: str,
        call: ChatCall,
        raw: dict[str, Raw],
        bypass: bool,
    ) -> CacheSlot | None:
        """Where this request's answer is kept, if the cache is on for it: `raw` is the
        client's body as its surface spelled it (`surface` names that API)."""
        if bypass or principal.key.peer_id is not None:
            return None
        if not enabled_for(principal, call.request.model, self.config):
            return None
        rewrite = self._rewriter(principal) if self._rewriter is not None else ""
        digest = canonical_digest(surface, raw, bool(call.request.stream), rewrite)
        return CacheSlot(scope_of(principal), digest)

    async def get(self, slot: CacheSlot) -> Kept | None:
        kept = await self._lookup(slot)
        self._metrics.cache_lookup(kept is not None)
        return kept

    async def _lookup(self, slot: CacheSlot) -> Kept | None:
        now = _now_ms()
        held = self._memory.get(slot)
        if held is not None:
            expires, kept = held
            if expires > now:
                self._memory.move_to_end(slot)
                return kept
            del self._memory[slot]
        try:
            found = await self._store.cached(slot.scope, slot.digest, now)
            kept = _kept_decoder.decode(found.answer) if found is not None else None
        except Exception:
            log.exception("the response cache could not be read: answered fresh")
            return None
        if found is not None and kept is not None:
            self._remember(slot, found.expires_ms, kept)
        return kept

    async def keep(self, slot: CacheSlot, kept: Kept) -> None:
        """Keep an answer: in this process's memory at once (unless `memory_entries` is 0),
        in the store by a task of its own, so that the answer it is kept from is not held up
        by the write (a transaction and the eviction of the least recently used, 0.2-0.4 ms
        on a 2-core machine); the other processes of the node find it there a moment later.
        At most `MAX_WRITES` at once: a store that stalls costs misses, not memory."""
        answer = _encoder.encode(kept)
        if len(answer) > self.config.max_answer_bytes:
            return
        now = _now_ms()
        expires = now + self.config.ttl * 1000
        self._remember(slot, expires, kept)
        if len(self._writing) >= MAX_WRITES:
            return  # the store is behind: not kept there (it is in memory, if memory keeps any)
        kept_answer = CachedAnswer(slot.scope, slot.digest, now, expires, answer)
        task = asyncio.get_running_loop().create_task(self._write(kept_answer, now))
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)

    async def _write(self, answer: CachedAnswer, now_ms: int) -> None:
        try:
            await self._store.keep(answer, now_ms, self.config.max_entries)
        except Exception:
            log.exception("the response cache could not keep an answer")

    async def settle(self) -> None:
        """Wait for the answers being written (at shutdown, and in tests)."""
        while self._writing:
            await asyncio.wait(set(self._writing))

    async def prune(self) -> None:
        """Forget expired answers (scheduled)."""
        now = _now_ms()
        for slot in [slot for slot, (expires, _) in self._memory.items() if expires <= now]:
            del self._memory[slot]
        await self._store.prune_cache(now)

    def _remember(self, slot: CacheSlot, expires_ms: int, kept: Kept) -> None:
        if self.config.memory_entries == 0:
            return
        self._memory[slot] = (expires_ms, kept)
        self._memory.move_to_end(slot)
        while len(self._memory) > self.config.memory_entries:
            self._memory.popitem(last=False)


def _now_ms() -> int:
    return int(time.time() * 1000)
