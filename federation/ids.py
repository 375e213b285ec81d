"""Request ids: time-ordered and unguessable."""

from __future__ import annotations

import secrets
import time


def new_request_id() -> str:
    """`req_` + milliseconds since the epoch (hex) + 64 random bits."""
    return f"req_{time.time_ns() // 1_000_000:012x}{secrets.token_hex(8)}"
