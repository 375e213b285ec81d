"""What a key or tenant may do: model allowlists, IP allowlists, budget periods, and the
worst-case cost a request may reach (what a budget reserves before the upstream call)."""

from __future__ import annotations

import calendar
import fnmatch
import functools
import ipaddress
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Annotated

import msgspec
from msgspec import Meta

from adapters.media import request_media
from adapters.tokens import MESSAGE_OVERHEAD, message_text
from adapters.types import ChatRequest, EmbeddingRequest

# The limits are stored with keys and tenants: their shape is the store's record.
from node.storage.records import Glob as Glob
from node.storage.records import Limits as Limits
from node.storage.records import Period as Period

PERIODS: tuple[Period, ...] = ("daily", "weekly", "monthly", "total")
Cidr = Annotated[str, Meta(min_length=1, max_length=64)]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def model_allowed(patterns: list[str] | None, model: str) -> bool:
    """Case-sensitive shell-style globs (`gpt-4o*`, `llama3`); no list allows every model."""
    if patterns is None:
        return True
    return any(fnmatch.fnmatchcase(model, pattern) for pattern in patterns)


def parse_networks(cidrs: list[str]) -> list[Network]:
    """Parse CIDRs (a bare address is a /32 or /128); raises ValueError on a bad one."""
    return [ipaddress.ip_network(cidr.strip(), strict=False) for cidr in cidrs]


def ip_allowed(networks: list[Network], ip: str | None) -> bool:
    if not networks:
        return True
    if ip is None:
        return False
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def period_start(period: Period, now: float) -> int:
    """Unix seconds at which the budget period containing `now` began (UTC); 0 for total."""
    # Every period begins at a UTC midnight, and a Unix day is exactly 86,400 s: the answer
    # depends on the day alone, so it is worked out once a day, not on every request.
    return _period_start_of_day(period, int(now // 86400))


@functools.lru_cache(maxsize=64)
def _period_start_of_day(period: Period, day_number: int) -> int:
    if period == "total":
        return 0
    day = datetime.fromtimestamp(day_number * 86400, UTC)
    if period == "weekly":
        day -= timedelta(days=day.weekday())
    elif period == "monthly":
        day = day.replace(day=1)
    return calendar.timegm(day.timetuple())


def period_end(period: Period, start: int) -> int | None:
    """When the period that began at `start` ends (and the budget resets); None for total."""
    if period == "total":
        return None
    begun = datetime.fromtimestamp(start, UTC)
    if period == "daily":
        return start + 86400
    if period == "weekly":
        return start + 7 * 86400
    year, month = (begun.year + 1, 1) if begun.month == 12 else (begun.year, begun.month + 1)
    return calendar.timegm(datetime(year, month, 1, tzinfo=UTC).timetuple())


Billers = Callable[[], Iterable[tuple[str, str]]]


def unknown_biller() -> Iterable[tuple[str, str]]:
    """No provider named: images, audio and files cost what the largest rule bills."""
    return (("openai", ""),)


def worst_case_prompt_tokens(request: ChatRequest, billers: Billers = unknown_biller) -> int:
    """An upper bound on prompt tokens: no tokenizer in use spends less than a byte a token,
    and images, audio and files cost what the most expensive of `billers()` (the (provider,
    upstream model) pairs that may serve the request; asked only if there are such parts)
    bills for them at most."""
    total = 0
    parts = False  # any multi-part content (which may hold images, audio, files)?
    for message in request.messages:
        parts = parts or isinstance(message.content, list)
        total += MESSAGE_OVERHEAD + len(message_text(message.content).encode())
        if message.name or message.refusal:
            total += len((message.name or "").encode()) + len((message.refusal or "").encode())
        for call in message.tool_calls or ():
            total += len((call.function.name or "").encode())
            total += len((call.function.arguments or "").encode())
    # Tool definitions and a response schema are prompt too, as the JSON bytes sent (a name or
    # description in a multi-byte script costs its bytes, not its characters).
    for tool in request.tools or ():
        total += MESSAGE_OVERHEAD + len(_json(tool.function))
    if request.response_format is not None:
        total += len(_json(request.response_format))
    media = request_media(request.messages) if parts else None
    if media is not None:
        total += max(media.tokens(provider, model) for provider, model in billers())
    return total


_json = msgspec.json.Encoder().encode


def worst_case_embedding_tokens(request: EmbeddingRequest) -> int:
    return sum(len(text.encode()) + 1 for text in request.texts())
