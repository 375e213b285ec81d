"""Requests and tokens per minute, and requests in flight, per key and per tenant.

Each limit counts what was admitted in one-second buckets over the last minute: at most 61
buckets per scope, and exact to the second. The check is conservative (a bucket counts until
the whole of it is more than a minute old), so no rolling minute ever holds more than the
limit, and the `Retry-After` it gives is the exact wait until a bucket leaves the window.
Counters live in the worker's memory; with several workers each enforces the limits on its
own share of the traffic.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

WINDOW = 60.0
_SPAN = int(WINDOW)


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

    scopes: list[ScopeLimits]
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


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._requests: dict[str, MinuteLog] = {}
        self._tokens: dict[str, MinuteLog] = {}
        self._in_flight: dict[str, int] = {}

    def admit(self, scopes: list[ScopeLimits]) -> Admission:
        """Admit a request under every scope's limits, or raise `RateLimited` and hold nothing."""
        now = self._clock()
        headers: dict[str, str] = {}
        for limits in scopes:
            self._check(limits, now, headers)
        for limits in scopes:
            if limits.rpm is not None:
                self._requests.setdefault(limits.scope, MinuteLog()).add(1, now)
            if limits.max_parallel is not None:
                self._in_flight[limits.scope] = self._in_flight.get(limits.scope, 0) + 1
        return Admission(scopes, headers)

    def _check(self, limits: ScopeLimits, now: float, headers: dict[str, str]) -> None:
        scope = limits.scope
        if limits.max_parallel is not None and self._in_flight.get(scope, 0) >= limits.max_parallel:
            raise RateLimited(
                f"Too many requests in flight for {scope} (max {limits.max_parallel})",
                1.0,
                {},
            )
        if limits.rpm is not None:
            log = self._requests.setdefault(scope, MinuteLog())
            used = log.used(now)
            wait = log.wait_until_below(limits.rpm, now)
            _set_headers(headers, "requests", limits.rpm, used + 1, wait)
            if wait > 0:
                raise RateLimited(
                    f"Rate limit reached for {scope}: {limits.rpm} requests per minute",
                    wait,
                    headers,
                )
        if limits.tpm is not None:
            log = self._tokens.setdefault(scope, MinuteLog())
            used = log.used(now)
            wait = log.wait_until_below(limits.tpm, now)
            _set_headers(headers, "tokens", limits.tpm, used, wait)
            if wait > 0:
                raise RateLimited(
                    f"Rate limit reached for {scope}: {limits.tpm} tokens per minute",
                    wait,
                    headers,
                )

    def release(self, admission: Admission, tokens: int) -> None:
        now = self._clock()
        for limits in admission.scopes:
            if limits.tpm is not None and tokens:
                self._tokens.setdefault(limits.scope, MinuteLog()).add(tokens, now)
            if limits.max_parallel is not None:
                self._in_flight[limits.scope] = max(0, self._in_flight.get(limits.scope, 0) - 1)


def _set_headers(headers: dict[str, str], kind: str, limit: int, used: float, wait: float) -> None:
    """Keep the tightest scope's figures: the one with the least room left."""
    remaining = max(0, math.floor(limit - used))
    key = f"x-ratelimit-remaining-{kind}"
    if key in headers and int(headers[key]) <= remaining:
        return
    headers[f"x-ratelimit-limit-{kind}"] = str(limit)
    headers[key] = str(remaining)
    headers[f"x-ratelimit-reset-{kind}"] = format_reset(wait if wait > 0 else WINDOW * used / limit)
