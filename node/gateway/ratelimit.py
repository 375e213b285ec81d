"""Requests and tokens per minute, and requests in flight, per key and per tenant, held across
every process that serves the node.

Each limit counts what was admitted in one-second buckets over the last minute, exact to the
second. The check is conservative (a bucket counts until the whole of it is more than a
minute old), so no rolling minute ever holds more than the limit, and the `Retry-After` it
gives is the wait until a bucket leaves the window.

The store decides (DESIGN.md: what must hold across processes is decided in the store), but a
process does not go to it for every request. It takes **leases**, as `node.gateway.budgets` does for
budgets, in one transaction for all of a request's scopes:

- requests per minute: a lease is a number of requests counted in the store's bucket of the
  current second (a tenth of the limit, at most 64), handed out in memory during that second
  only, so that each request is counted in the bucket of the second it was admitted in. What
  a lease did not use is given back at the next sync (at most a second later);
- parallel slots: a process holds slots per scope in the store, under an expiry it renews
  every second; slots it no longer needs go back at the next sync, and the slots of a process
  that died come back when their expiry passes (`SLOT_TTL`). A process admits from its slots
  only for `SLOTS_FRESH` seconds (less than `SLOT_TTL`) after the start of its last sync:
  one cut off from the store stops using them before the others may count them free, and
  syncs first (a 503 while the store is away); a renewal that finds its slots expired holds
  again only those of its requests still in flight, and takes new ones under the limit;
- tokens per minute are counted after the fact (a request's tokens are known at its end), so
  each process writes what its requests used and reads back the others' at every sync (each
  second while it has any): a limit seen at most a second late by the other processes.

On the single-process hot path this is one small transaction per scope and second (or per
lease used up), not per request; a key without limits touches none of it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from node.storage.base import Store
from node.storage.records import SLOT_TTL, RateAnswer, RateSync, RateTake

log = logging.getLogger("aihub")

WINDOW = 60.0
_SPAN = int(WINDOW)
# Parallel slots are admitted from for this long after the start of the last sync that
# renewed them: SLOT_TTL (after which the others count them free) less a margin for the sync's
# own round trip and a busy event loop, as budget leases keep (`budgets.LEASE_FRESH`).
SLOTS_FRESH = 10.0
assert SLOTS_FRESH < SLOT_TTL


@dataclass
class MinuteLog:
    buckets: deque[list[int]] = field(default_factory=deque)  # [second, amount], oldest first
    total: int = 0

    def _evict(self, now: float) -> None:
        oldest_kept = math.floor(now) - _SPAN
        while self.buckets and self.buckets[0][0] < oldest_kept:
            self.total -= self.buckets.popleft()[1]

    def used(self, now: float) -> int:
        self._evict(now)
        return self.total

    def add(self, amount: int, now: float) -> None:
        self._evict(now)
        second = math.floor(now)
        if self.buckets and self.buckets[-1][0] == second:
            self.buckets[-1][1] += amount
        else:
            self.buckets.append([second, amount])
        self.total += amount

    def wait_until_below(self, limit: int, now: float) -> float:
        """Seconds until the total drops below `limit` (0 if it already has)."""
        total = self.used(now)
        if total < limit:
            return 0.0
        for second, amount in self.buckets:
            total -= amount
            if total < limit:
                # A bucket leaves once all of it is more than a minute old.
                return max(second + _SPAN + 1 - now, 0.001)
        return WINDOW  # not reached: an empty log's total is 0


@dataclass
class ScopeLimits:
    scope: str
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None


@dataclass
class Admission:
    """What one admitted request holds; given back to `release` when it ends."""

    scopes: Sequence[ScopeLimits]
    headers: dict[str, str] = field(default_factory=dict)


class RateLimited(Exception):
    def __init__(self, message: str, retry_after: float, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.headers = headers


def format_reset(seconds: float) -> str:
    """OpenAI's style for `x-ratelimit-reset-*`: `20ms`, `1s`, `6m0s`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


LEASE_SHARE = 10  # a lease of requests is at most a tenth of the limit…
LEASE_MAX = 256  # …and at most this many requests (a busy process syncs a few times a second)


@dataclass
class RequestLease:
    """Requests this process may admit in one second, for one scope."""

    second: int
    limit: int  # the limit it was taken under: a lease under another limit is not used
    granted: int = 0
    used: int = 0
    base: int = 0  # what the other leases of the window held when this one was last topped up


@dataclass
class TokenLog:
    """Tokens of one scope: the store's per-second counts as last read, and what this process
    used since."""

    synced: MinuteLog = field(default_factory=lambda: MinuteLog())
    pending: MinuteLog = field(default_factory=lambda: MinuteLog())

    def read(self, buckets: list[tuple[int, int]]) -> None:
        self.synced = minute_of(buckets)

    def used(self, now: float) -> int:
        return self.synced.used(now) + self.pending.used(now)

    def wait(self, limit: int, now: float) -> float:
        """`MinuteLog.wait_until_below` for the synced counts and what is pending."""
        merged: dict[int, int] = {}
        for second, amount in [*self.synced.buckets, *self.pending.buckets]:
            merged[second] = merged.get(second, 0) + amount
        return minute_of(sorted(merged.items())).wait_until_below(limit, now)


def minute_of(buckets: list[tuple[int, int]]) -> MinuteLog:
    """A minute's log holding these (second, amount) counts, oldest first."""
    minute = MinuteLog(deque([second, amount] for second, amount in buckets))
    minute.total = sum(amount for _, amount in buckets)
    return minute


def _lease_size(limit: int) -> int:
    return max(1, min(limit // LEASE_SHARE, LEASE_MAX))


@dataclass
class Slots:
    """Parallel slots of one scope: held in the store by this process, and in use."""

    held: int = 0
    in_flight: int = 0
    # Idle slots kept beyond those in use at a sync: a tenth of the limit (none for a small
    # one, so that other processes can have every slot), else each new concurrent request
    # would wait for a store round trip, one at a time.
    spare: int = 0


class RateLimiter:
    def __init__(
        self,
        store: Store,
        clock: Callable[[], float] = time.time,
        fresh_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._clock = clock  # wall clock: the processes of a node share it through the store
        self._fresh_clock = fresh_clock  # for SLOTS_FRESH (a test moves it)
        self._slots_fresh_until = 0.0
        self.holder = secrets.token_hex(8)  # this process, in the store's parallel slots
        self._requests: dict[str, RequestLease] = {}
        self._tokens: dict[str, TokenLog] = {}
        self._slots: dict[str, Slots] = {}
        self._lock = asyncio.Lock()  # one store sync at a time per process

    async def admit(self, scopes: Sequence[ScopeLimits]) -> Admission:
        """Admit a request under every scope's limits, or raise `RateLimited` and hold nothing."""
        admission = self._admit_here(scopes, self._clock())
        if admission is not None:
            return admission
        async with self._lock:
            while True:
                now = self._clock()
                admission = self._admit_here(scopes, now)
                if admission is not None:
                    return admission
                await self._lease(scopes, now)

    def _admit_here(self, scopes: Sequence[ScopeLimits], now: float) -> Admission | None:
        """Admit from this process's leases (no await: atomic within the process); None if a
        lease is missing, RateLimited if the tokens of the last minute are over a limit."""
        second = math.floor(now)
        headers: dict[str, str] = {}
        for limits in scopes:
            if limits.tpm is not None:
                self._check_tokens(limits, now, headers)
            if limits.rpm is not None and not self._has_request(limits, second):
                return None
            if limits.max_parallel is not None and not self._has_slot(limits):
                return None
        for limits in scopes:
            if limits.rpm is not None:
                lease = self._requests[limits.scope]
                lease.used += 1
                _set_headers(headers, "requests", limits.rpm, lease.base + lease.used, 0)
            if limits.max_parallel is not None:
                self._slots[limits.scope].in_flight += 1
        return Admission(scopes, headers)

    def _has_request(self, limits: ScopeLimits, second: int) -> bool:
        lease = self._requests.get(limits.scope)
        return (
            lease is not None
            and lease.second == second
            and lease.limit == limits.rpm
            and lease.used < lease.granted
        )

    def _has_slot(self, limits: ScopeLimits) -> bool:
        return self._slot_free(limits) and self._fresh_clock() < self._slots_fresh_until

    def _slot_free(self, limits: ScopeLimits) -> bool:
        """A slot held and not in use (fresh or not: a sync renews what is held)."""
        slots = self._slots.get(limits.scope)
        return slots is not None and slots.in_flight < min(slots.held, limits.max_parallel or 0)

    def _check_tokens(self, limits: ScopeLimits, now: float, headers: dict[str, str]) -> None:
        assert limits.tpm is not None
        tokens = self._token_log(limits.scope)
        used = tokens.used(now)
        wait = tokens.wait(limits.tpm, now) if used >= limits.tpm else 0.0
        _set_headers(headers, "tokens", limits.tpm, used, wait)
        if wait > 0:
            raise RateLimited(
                f"Rate limit reached for {limits.scope}: {limits.tpm} tokens per minute",
                wait,
                headers,
            )

    def _token_log(self, scope: str) -> TokenLog:
        """The scope's token log, made on first use: `setdefault(scope, TokenLog())` built a
        log (two minute logs, two deques) on every admission and release, twice a request,
        only to throw it away."""
        tokens = self._tokens.get(scope)
        if tokens is None:
            tokens = self._tokens[scope] = TokenLog()
        return tokens

    async def _lease(self, scopes: Sequence[ScopeLimits], now: float) -> None:
        """Take from the store what this request's scopes lack, or raise `RateLimited`."""
        second = math.floor(now)
        takes, returns = [], []
        for limits in scopes:
            if limits.rpm is not None and not self._has_request(limits, second):
                lease = self._requests.get(limits.scope)
                if lease is not None and lease.limit != limits.rpm:
                    # Taken under another limit (the key changed): give back what is left.
                    del self._requests[limits.scope]
                    returns.append((limits.scope, lease.second, lease.granted - lease.used))
                want = _lease_size(limits.rpm)
                takes.append(RateTake(limits.scope, "requests", limits.rpm, want))
            if limits.max_parallel is not None and not self._slot_free(limits):
                want = _lease_size(limits.max_parallel)
                takes.append(RateTake(limits.scope, "parallel", limits.max_parallel, want))
        answer = await self._sync(second, takes, returns)
        if answer.refused is not None:
            raise _refusal(scopes, takes[answer.refused], answer, now)
        for take, granted, used in zip(takes, answer.granted, answer.used, strict=True):
            if take.kind == "parallel":
                slots = self._slots.setdefault(take.scope, Slots())
                slots.held += granted
                slots.spare = _lease_size(take.limit) - 1
                continue
            lease = self._requests.get(take.scope)
            if lease is None or lease.second != second:
                lease = self._requests[take.scope] = RequestLease(second, take.limit)
            lease.base = used - lease.granted
            lease.granted += granted

    async def _sync(
        self,
        second: int,
        takes: list[RateTake],
        returns: list[tuple[str, int, int]] | None = None,
    ) -> RateAnswer:
        """One transaction: give back what leases of past seconds did not use, write the
        tokens used, renew (or shrink to what is in use) the parallel slots held, read the
        other processes' tokens, and grant `takes`. The bookkeeping is taken out of memory
        before the await, so that requests admitted meanwhile are counted at the next sync."""
        returns = returns or []
        for scope, lease in list(self._requests.items()):
            if lease.second != second:
                del self._requests[scope]
                if lease.granted > lease.used:
                    returns.append((scope, lease.second, lease.granted - lease.used))
        tokens = []
        for scope, log_ in self._tokens.items():
            tokens.extend((scope, second, amount) for second, amount in log_.pending.buckets)
            log_.pending = MinuteLog()
        slots = []
        for scope, held in list(self._slots.items()):
            # Idle slots past the spare go back (all of them once none is in use: an idle
            # node syncs nothing): other processes may need them.
            held.held = min(held.held, held.in_flight + held.spare) if held.in_flight else 0
            slots.append((scope, held.held, held.in_flight))
            if not held.held and not held.in_flight:
                del self._slots[scope]
        read = list(self._tokens)
        sync = RateSync(self.holder, second, takes, returns, tokens, slots, read)
        started = self._fresh_clock()
        answer = await self._store.spend.rate_sync(sync)
        self._slots_fresh_until = started + SLOTS_FRESH
        for scope in answer.lost:
            # Expired, and perhaps taken by others meanwhile: the store holds the requests in
            # flight again (they run), the idle slots are gone, and new requests take slots
            # anew under the limit, counting everyone's.
            if scope in self._slots:
                self._slots[scope].held = min(self._slots[scope].held, self._slots[scope].in_flight)
        for scope in read:
            if scope in self._tokens:
                self._tokens[scope].read(answer.buckets.get(scope, []))
        return answer

    async def sync(self) -> None:
        """The per-second bookkeeping when there is any (a schedule calls this)."""
        second = math.floor(self._clock())
        busy = (
            self._slots
            or self._tokens
            or any(lease.second != second for lease in self._requests.values())
        )
        if not busy:
            return
        async with self._lock:
            await self._sync(second, [])
        # A scope whose tokens have all left the window is read no more.
        for scope, tokens in list(self._tokens.items()):
            if not tokens.used(self._clock()):
                del self._tokens[scope]

    async def stop(self) -> None:
        """The process stops: write what it owes and give back every slot at once."""
        try:
            await self.sync()
            await self._store.spend.release_slots(self.holder)
        except Exception:  # the node is stopping: the slots' expiry gives them back anyway
            log.exception("could not give back rate-limit leases")

    def release(self, admission: Admission, tokens: int) -> None:
        now = self._clock()
        for limits in admission.scopes:
            if limits.tpm is not None and tokens:
                self._token_log(limits.scope).pending.add(tokens, now)
            if limits.max_parallel is not None:
                slots = self._slots.get(limits.scope)
                if slots is not None:
                    slots.in_flight = max(0, slots.in_flight - 1)


def _refusal(
    scopes: Sequence[ScopeLimits], take: RateTake, answer: RateAnswer, now: float
) -> RateLimited:
    if take.kind == "parallel":
        return RateLimited(
            f"Too many requests in flight for {take.scope} (max {take.limit})", 1.0, {}
        )
    minute = minute_of(answer.buckets.get(take.scope, []))
    wait = minute.wait_until_below(take.limit, now) or 1.0
    headers: dict[str, str] = {}
    _set_headers(headers, "requests", take.limit, take.limit, wait)
    return RateLimited(
        f"Rate limit reached for {take.scope}: {take.limit} requests per minute",
        wait,
        headers,
    )


def _header_names(kind: str) -> tuple[str, str, str]:
    return (
        f"x-ratelimit-limit-{kind}",
        f"x-ratelimit-remaining-{kind}",
        f"x-ratelimit-reset-{kind}",
    )


# The headers' names, built once: formatted anew they were six strings a request.
_HEADER_NAMES = {kind: _header_names(kind) for kind in ("requests", "tokens")}


def _set_headers(headers: dict[str, str], kind: str, limit: int, used: float, wait: float) -> None:
    """Keep the tightest scope's figures: the one with the least room left."""
    remaining = max(0, math.floor(limit - used))
    limit_name, key, reset_name = _HEADER_NAMES[kind]
    if key in headers and int(headers[key]) <= remaining:
        return
    headers[limit_name] = str(limit)
    headers[key] = str(remaining)
    headers[reset_name] = format_reset(wait if wait > 0 else WINDOW * used / limit)
