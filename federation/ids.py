"""Request ids: time-ordered and unguessable."""

from __future__ import annotations

import base64
import os
import threading
import time

# Random bytes are drawn from the OS this many at a time: `secrets.token_hex(8)` per id was a
# `getrandom` system call on every request (~1 µs warm). The bytes are the same CSPRNG's, each
# used once.
_POOL_BYTES = 4096
_ID_BYTES = 8


class _RandomPool:
    """The OS's random bytes, handed out in slices, never twice, never to two processes: a
    forked child starts with none (`os.register_at_fork`), so that it cannot hand out the
    bytes its parent will. The process's own, as `random`'s state is: not app state."""

    def __init__(self) -> None:
        self._bytes = b""
        self._at = 0
        # Two threads must not both read `_at` before either moves it past their slice.
        self._lock = threading.Lock()

    def clear(self) -> None:
        self._bytes, self._at = b"", 0
        self._lock = threading.Lock()  # the parent's may have been held by another thread

    def take(self, count: int) -> bytes:
        with self._lock:
            at = self._at
            if at + count > len(self._bytes):
                self._bytes, at = os.urandom(_POOL_BYTES), 0
            self._at = at + count
            return self._bytes[at : at + count]


_pool = _RandomPool()
os.register_at_fork(after_in_child=_pool.clear)


def random_hex(count: int) -> str:
    """As `secrets.token_hex(count)`, from the pool: for ids and nonces made on a request's
    path, where `secrets.token_*` is a `getrandom` system call each (~9 µs a call at 1,000
    requests a second, py-spy)."""
    return _pool.take(count).hex()


def random_urlsafe(count: int) -> str:
    """As `secrets.token_urlsafe(count)`, from the pool."""
    return base64.urlsafe_b64encode(_pool.take(count)).rstrip(b"=").decode("ascii")


def new_request_id() -> str:
    """`req_` + milliseconds since the epoch (hex) + 64 random bits."""
    return f"req_{time.time_ns() // 1_000_000:012x}{_pool.take(_ID_BYTES).hex()}"
