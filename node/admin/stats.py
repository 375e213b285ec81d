"""Usage over time through the admin API: requests, errors, tokens, cost and latency (p50,
p95) per bucket of the last hour, day, week or month, computed in the store."""

from __future__ import annotations

import time
from typing import Literal

import msgspec
from litestar import Request, Response, get

from node.admin.routes import flushed_store, json_response, query_param, require_admin
from node.ingress.errors import ApiError
from node.storage.records import SeriesPoint

Window = Literal["hour", "day", "week", "month"]
# Each window: how many buckets of how many seconds (a chart's worth of points).
WINDOWS: dict[str, tuple[int, int]] = {
    "hour": (60, 60),
    "day": (96, 15 * 60),
    "week": (84, 2 * 3600),
    "month": (120, 6 * 3600),
}


class Series(msgspec.Struct, tag_field="object", tag="series"):
    """Every bucket of the window, oldest first, empty ones included (latencies null)."""

    window: str
    bucket_seconds: int
    start_ms: int
    end_ms: int
    data: list[SeriesPoint]


def buckets(window: str, now: float) -> tuple[int, int, int]:
    """(start ms, bucket ms, count): the window's buckets, the last one holding `now`."""
    count, seconds = WINDOWS[window]
    bucket_ms = seconds * 1000
    end = (int(now * 1000) // bucket_ms + 1) * bucket_ms
    return end - count * bucket_ms, bucket_ms, count


def filled(points: list[SeriesPoint], start: int, bucket_ms: int, count: int) -> list[SeriesPoint]:
    """The store answers only the buckets that have requests: the rest, as zeros."""
    found = {point.start_ms: point for point in points}
    return [
        found.get(at) or SeriesPoint(at, 0, 0, 0, 0, 0, None, None)
        for at in range(start, start + count * bucket_ms, bucket_ms)
    ]


@get("/admin/stats/series")
async def series(request: Request) -> Response[bytes]:
    await require_admin(request)
    window = query_param(request, "window", "day")
    if window not in WINDOWS:
        raise ApiError(
            400, f"`window` is one of hour, day, week, month; not {window[:40]!r}", param="window"
        )
    start, bucket_ms, count = buckets(window, time.time())
    points = await (await flushed_store(request)).usage.usage_series(start, bucket_ms)
    data = filled(points, start, bucket_ms, count)
    return json_response(Series(window, bucket_ms // 1000, start, start + count * bucket_ms, data))


STATS_ROUTES = [series]
