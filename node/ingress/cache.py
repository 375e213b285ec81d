"""What every surface reads of a client's say over the response cache (`node/gateway/cache.py`):
its `Cache-Control` header and the body's `cache` field, which is taken out of the body so that
no upstream is sent a field it does not know."""

from __future__ import annotations

from typing import Any

from litestar import Request

from node.gateway.cache import BODY_FIELD, body_bypass, header_bypass
from node.ingress.errors import ApiError
from node.ingress.headers import headers_of

# How an answer says where it came from: "hit" (the cache) or "miss" (asked, and kept).
CACHE_HEADER = "aihub-cache"


def cache_bypass(request: Request, raw: dict[str, Any]) -> bool:
    """Whether the client asked for a fresh answer; the body's `cache` field removed."""
    try:
        from_body = body_bypass(raw.pop(BODY_FIELD, None))
    except ValueError as exc:
        raise ApiError(400, str(exc), param=BODY_FIELD) from None
    return from_body or header_bypass(headers_of(request).get("cache-control", ""))
