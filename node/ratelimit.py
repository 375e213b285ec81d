"""Requests and tokens per minute, and requests in flight, per key and per tenant.

Sliding-window counters (the current minute's count plus the previous minute's, weighted by
how much of it still lies inside the window): O(1) memory per scope, no burst at a window's
edge, and an exact time to wait for the `Retry-After` header. Counters live in the worker's
memory; with several workers each enforces the limits on its own share of the traffic.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

WINDOW = 60.0


@dataclass
class SlidingWindow:
    start: float = 0.0
    current: int = 0
    previous: int = 0

    def _roll(self, now: float) -> None:
        windows = math.floor(now / WINDOW)
        start = windows * WINDOW
        if start == self.start:
            return
        self.previous = self.current if start - self.start == WINDOW else 0
        self.current = 0
        self.start = start

    def estimate(self, now: float) -> float:
        self._roll(now)
        weight = 1.0 - (now - self.start) / WINDOW
        return self.previous * weight + self.current

    def add(self, amount: int, now: float) -> None:
        self._roll(now)
        self.current += amount

    def wait_until_below(self, limit: int, now: float) -> float:
        """Seconds until the estimate drops below `limit` (0 if it already is)."""
        self._roll(now)
        elapsed = now - self.start
        if self.previous * (1 - elapsed / WINDOW) + self.current < limit:
            return 0.0
        if self.current < limit and self.previous > 0:
            # Within this window, as the previous window's weight fades.
            return max(0.0, WINDOW * (1 - (limit - self.current) / self.previous) - elapsed)
        # Only in a later window, as this window's count fades in its turn.
        fade = WINDOW * (1 - limit / self.current) if self.current else 0.0
        return (WINDOW - elapsed) + max(0.0, fade)


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
        self._requests: dict[str, SlidingWindow] = {}
        self._tokens: dict[str, SlidingWindow] = {}
        self._in_flight: dict[str, int] = {}

    def admit(self, scopes: list[ScopeLimits]) -> Admission:
        """Admit a request under every scope's limits, or raise `RateLimited` and hold nothing."""
        now = self._clock()
        headers: dict[str, str] = {}
        for limits in scopes:
            self._check(limits, now, headers)
        for limits in scopes:
            if limits.rpm is not None:
                self._requests.setdefault(limits.scope, SlidingWindow()).add(1, now)
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
            window = self._requests.setdefault(scope, SlidingWindow())
            used = window.estimate(now)
            wait = window.wait_until_below(limits.rpm, now)
            _set_headers(headers, "requests", limits.rpm, used + 1, wait)
            if wait > 0:
                raise RateLimited(
                    f"Rate limit reached for {scope}: {limits.rpm} requests per minute",
                    wait,
                    headers,
                )
        if limits.tpm is not None:
            window = self._tokens.setdefault(scope, SlidingWindow())
            used = window.estimate(now)
            wait = window.wait_until_below(limits.tpm, now)
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
                self._tokens.setdefault(limits.scope, SlidingWindow()).add(tokens, now)
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
