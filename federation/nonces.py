"""The receiver's memory of request-signature nonces, so that a signed request is used once.

A signature is valid from `created` to `expires` (see `federation.httpsig`); within that window
the same (keyid, nonce) pair must not be accepted twice. The cache therefore keeps each pair
until its `expires` has passed and forgets it afterwards: a replay after that is refused by the
expiry check, not by the cache.
"""

from __future__ import annotations

import heapq
import threading


class NonceCacheFull(RuntimeError):
    """The cache holds `max_entries` unexpired nonces and cannot take another."""


class NonceCache:
    """Nonces seen per signer, each kept until its signature expires.

    Expired entries are pruned lazily on every `remember`, oldest first, from a heap ordered by
    expiry: the cost is O(log n) per entry, paid once, and nothing runs in the background.

    The size is bounded by `max_entries`. When it is full, `remember` raises `NonceCacheFull`
    instead of evicting anything: forgetting a nonce whose signature is still valid would let
    anyone who can send (or has captured) enough signed requests flush the cache and then replay
    a captured request inside its validity window. Failing closed costs availability for a few
    seconds at most (until the oldest entries expire), never safety. With the verifier's default
    limits an entry lives at most max_ttl + skew (10 minutes), so 100,000 entries sustain about
    160 signed requests per second.

    Safe to share between threads; holds no global state.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._expiry: dict[tuple[str, str], int] = {}
        self._heap: list[tuple[int, str, str]] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._expiry)

    def remember(self, keyid: str, nonce: str, expires: int, now: int) -> bool:
        """Record `nonce` for `keyid` until `expires` (inclusive).

        True if the nonce is new (it is now remembered); False if it was already seen and has
        not expired, i.e. a replay. Raises `NonceCacheFull` when a new nonce cannot be stored.
        A nonce that has already expired (`expires < now`) is reported new but not stored: the
        caller's expiry check is what refuses it.
        """
        key = (keyid, nonce)
        with self._lock:
            self._prune(now)
            if key in self._expiry:
                return False
            if expires < now:
                return True
            if len(self._expiry) >= self.max_entries:
                raise NonceCacheFull(
                    f"nonce cache holds {self.max_entries} unexpired nonces; try again later"
                )
            self._expiry[key] = expires
            heapq.heappush(self._heap, (expires, keyid, nonce))
            return True

    def _prune(self, now: int) -> None:
        heap, expiry = self._heap, self._expiry
        while heap and heap[0][0] < now:
            expires, keyid, nonce = heapq.heappop(heap)
            # The pair may have been stored again later with another expiry (only if the
            # caller's clock went backwards); drop the mapping only if it is this entry's.
            if expiry.get((keyid, nonce)) == expires:
                del expiry[(keyid, nonce)]
