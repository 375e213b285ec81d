"""Property tests for what a key may do: model globs, IP allowlists, budget periods, rate
limits."""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import tempfile
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from node.gateway import ratelimit
from node.gateway.policy import (
    ip_allowed,
    model_allowed,
    parse_networks,
    period_end,
    period_start,
)
from node.gateway.ratelimit import WINDOW, MinuteLog, RateLimited, RateLimiter, ScopeLimits
from node.storage import open_store

names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)


@given(model=names)
def test_no_allowlist_allows_everything(model):
    assert model_allowed(None, model)


@given(model=names, prefix_len=st.integers(0, 30))
def test_prefix_glob_allows_exactly_the_prefix(model, prefix_len):
    prefix = model[:prefix_len]
    assume(not any(c in prefix for c in "*?[]"))
    assert model_allowed([prefix + "*"], model)
    assert model_allowed([prefix + "*"], prefix + "-anything")
    other = "x" + model
    assert model_allowed([prefix + "*"], other) == other.startswith(prefix)


@given(model=names, patterns=st.lists(names, max_size=5))
def test_allowlist_is_any_pattern_matching(model, patterns):
    expected = any(fnmatch.fnmatchcase(model, p) for p in patterns)
    assert model_allowed(patterns, model) == expected
    assert not model_allowed([], model)


def test_globs_are_case_sensitive_and_literal_otherwise():
    assert model_allowed(["gpt-4o*", "llama3"], "gpt-4o-mini")
    assert model_allowed(["gpt-4o*", "llama3"], "llama3")
    assert not model_allowed(["gpt-4o*", "llama3"], "llama3.1")
    assert not model_allowed(["gpt-4o*"], "GPT-4o")


ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))


@given(network=st.integers(0, 2**32 - 1), prefix=st.integers(0, 32), address=ipv4)
def test_cidr_membership_matches_ipaddress(network, prefix, address):
    net = ipaddress.IPv4Network((network, prefix), strict=False)
    networks = parse_networks([str(net)])
    assert ip_allowed(networks, address) == (ipaddress.IPv4Address(address) in net)
    # An IPv4 client seen through an IPv6 socket is still the same address.
    assert ip_allowed(networks, f"::ffff:{address}") == (ipaddress.IPv4Address(address) in net)


@given(address=st.one_of(ipv4, st.text(max_size=40), st.none()))
def test_empty_allowlist_allows_anyone_and_garbage_is_refused(address):
    assert ip_allowed([], address)
    networks = parse_networks(["10.0.0.0/8"])
    if address is None:
        assert not ip_allowed(networks, address)
    else:
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            assert not ip_allowed(networks, address)
        else:
            assert ip_allowed(networks, address) == (parsed in networks[0])


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "300.1.1.1", "x", "::1/129"])
def test_bad_cidrs_are_refused(bad):
    with pytest.raises(ValueError):
        parse_networks([bad])


@given(now=st.integers(0, 4_000_000_000), period=st.sampled_from(["daily", "weekly", "monthly"]))
def test_periods_contain_now_and_tile_time(now, period):
    start = period_start(period, now)
    end = period_end(period, start)
    assert end is not None
    assert start <= now < end
    # The next period begins where this one ends.
    assert period_start(period, end) == end
    begun = datetime.fromtimestamp(start, UTC)
    assert (begun.hour, begun.minute, begun.second) == (0, 0, 0)
    if period == "weekly":
        assert begun.weekday() == 0
    if period == "monthly":
        assert begun.day == 1


def test_total_period_never_resets():
    assert period_start("total", 1_800_000_000) == 0
    assert period_end("total", 0) is None


# --- rate limits ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000 * WINDOW

    def __call__(self) -> float:
        return self.now


def limited(clock: Clock, work: Callable[[RateLimiter], Awaitable[None]]) -> None:
    """Run `work` with a rate limiter on a fresh store (what it takes its leases from)."""

    async def run() -> None:
        with tempfile.TemporaryDirectory() as folder:
            store = await open_store(Path(folder) / "aihub.db")
            try:
                await work(RateLimiter(store, clock))
            finally:
                await store.close()

    asyncio.run(run())


@settings(max_examples=100, deadline=None)
@given(
    limit=st.integers(1, 50),
    gaps=st.lists(st.floats(0, 30, allow_nan=False), min_size=1, max_size=120),
)
def test_admitted_requests_never_exceed_the_limit_in_any_window(limit, gaps):
    clock = Clock()
    scope = ScopeLimits("key:k", rpm=limit)
    admitted: list[float] = []

    async def work(limiter: RateLimiter) -> None:
        for gap in gaps:
            clock.now += gap
            try:
                limiter.release(await limiter.admit([scope]), 0)
            except RateLimited as refused:
                assert refused.retry_after > 0
                assert refused.headers["x-ratelimit-limit-requests"] == str(limit)
                continue
            admitted.append(clock.now)

    limited(clock, work)
    # The sliding estimate never undercounts requests in the last minute.
    for index, at in enumerate(admitted):
        recent = [t for t in admitted[: index + 1] if at - t < WINDOW]
        assert len(recent) <= limit


@settings(deadline=None)
@given(limit=st.integers(1, 20), extra=st.integers(1, 5))
def test_retry_after_is_enough(limit, extra):
    clock = Clock()
    scope = ScopeLimits("key:k", rpm=limit)

    async def work(limiter: RateLimiter) -> None:
        for _ in range(limit):
            await limiter.admit([scope])
        with pytest.raises(RateLimited) as refused:
            await limiter.admit([scope])
        clock.now += refused.value.retry_after + 1e-6
        await limiter.admit([scope])  # admitted once the advertised wait is over

    limited(clock, work)


def test_tokens_per_minute_count_actual_tokens():
    clock = Clock()
    scope = ScopeLimits("key:k", tpm=100)

    async def work(limiter: RateLimiter) -> None:
        limiter.release(await limiter.admit([scope]), 150)
        with pytest.raises(RateLimited) as refused:
            await limiter.admit([scope])
        assert refused.value.headers["x-ratelimit-remaining-tokens"] == "0"
        clock.now += 2 * WINDOW
        await limiter.admit([scope])

    limited(clock, work)


def test_a_scopes_token_log_is_made_once_not_per_request(monkeypatch):
    """Admission and release use the scope's one token log: none is built (and thrown away)
    per request, and what each request used adds up in it."""
    clock = Clock()
    scope = ScopeLimits("key:k", tpm=1000)
    made: list[object] = []

    class Counted(ratelimit.TokenLog):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

    monkeypatch.setattr(ratelimit, "TokenLog", Counted)

    async def work(limiter: RateLimiter) -> None:
        for _ in range(5):
            clock.now += 1
            limiter.release(await limiter.admit([scope]), 10)
        assert len(made) == 1
        assert limiter._tokens["key:k"] is made[0]
        assert limiter._tokens["key:k"].used(clock.now) == 50

    limited(clock, work)


def test_an_admission_states_each_limit_in_openais_headers():
    """Both kinds of limit, under their exact header names, with the room left."""
    scope = ScopeLimits("key:k", rpm=100, tpm=1000)

    async def work(limiter: RateLimiter) -> None:
        admitted = await limiter.admit([scope])
        assert admitted.headers == {
            "x-ratelimit-limit-tokens": "1000",
            "x-ratelimit-remaining-tokens": "1000",
            "x-ratelimit-reset-tokens": "0ms",
            "x-ratelimit-limit-requests": "100",
            "x-ratelimit-remaining-requests": "99",
            "x-ratelimit-reset-requests": "600ms",
        }

    limited(Clock(), work)


def test_parallel_limit_and_all_or_nothing_admission():
    key = ScopeLimits("key:k", max_parallel=1)
    tenant = ScopeLimits("tenant:t", rpm=100)

    async def work(limiter: RateLimiter) -> None:
        held = await limiter.admit([key, tenant])
        with pytest.raises(RateLimited):
            await limiter.admit([key, tenant])
        # The refused request took nothing from the tenant's minute.
        assert limiter._requests["tenant:t"].used == 1
        limiter.release(held, 0)
        await limiter.admit([key, tenant])

    limited(Clock(), work)


@given(
    events=st.lists(st.tuples(st.floats(0, 5, allow_nan=False), st.integers(0, 100)), max_size=100),
)
def test_minute_log_counts_what_the_last_minute_holds(events):
    log = MinuteLog()
    now = 600.0
    seen: list[tuple[float, int]] = []
    for gap, amount in events:
        now += gap
        log.add(amount, now)
        seen.append((now, amount))
        # Never less than the true rolling minute, never more than the last 61 seconds.
        exact = sum(a for t, a in seen if now - t < WINDOW)
        generous = sum(a for t, a in seen if now - t < WINDOW + 1)
        assert exact <= log.used(now) <= generous
    assert len(log.buckets) <= 61
