"""The receiver's memory of request-signature nonces, so that a signed request is used once.

A signature is valid from `created` to `expires` (see `federation.httpsig`); within that window
the same (keyid, nonce) pair must not be accepted twice. The cache therefore keeps each pair
until its `expires` has passed and forgets it afterwards: a replay after that is refused by the
expiry check, not by the cache.
"""

from __future__ import annotations

import hashlib
import heapq
import secrets
import threading


def nonce_digest(context: str, signer: str, nonce: str) -> bytes:
    """The key of a nonce in a node's durable record: a 128-bit BLAKE2b digest of who used it
    and for what (a request signature, a join proof), length-prefixed so that no two
    different triples share an encoding. Unkeyed, unlike the cache's hash, because every
    process of the node and every restart must compute the same one; 128 bits leave no
    room to aim two nonces at one digest."""
    pair = f"{len(context)}:{context}{len(signer)}:{signer}{nonce}".encode()
    return hashlib.blake2b(pair, digest_size=16).digest()


class NonceCacheFull(RuntimeError):
    """The cache holds `max_entries` unexpired nonces and cannot take another."""


class NonceCache:
    """Nonces seen per signer, each kept until its signature expires.

    A (keyid, nonce) pair is kept as a 64-bit keyed hash (BLAKE2b under a key made at start),
    grouped by expiry second: about 130 bytes an entry, where the pair's own strings and tuples
    took about 290. Nobody who lacks the key can aim two pairs at one hash, and two honest
    pairs collide with odds of n in 2^64: the cost of a collision is one refused request,
    never an accepted replay. Expired groups are pruned lazily on every `remember`, oldest
    first, from a heap of expiry seconds; nothing runs in the background.

    The size is bounded by `max_entries`. When it is full, `remember` raises `NonceCacheFull`
    instead of evicting anything: forgetting a nonce whose signature is still valid would let
    anyone who can send (or has captured) enough signed requests flush the cache and then replay
    a captured request inside its validity window. Failing closed costs availability for a few
    seconds at most (until the oldest entries expire), never safety. Our nodes sign for 60 s, so
    an entry lives 60 s + the verifier's 300 s of skew: the default 300,000 entries (about 40 MB
    when full) sustain about 830 of their signed requests per second (a signer that asks for
    the longest validity the verifier allows, 300 s, gets half that).

    Safe to share between threads; holds no global state.
    """

    def __init__(self, max_entries: int = 300_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._key = secrets.token_bytes(16)
        self._expiry: dict[int, int] = {}  # pair's hash -> its expiry
        self._groups: dict[int, list[int]] = {}  # expiry -> the hashes stored with it
        self._due: list[int] = []  # the groups' expiries, as a heap
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._expiry)

    def _hash(self, keyid: str, nonce: str) -> int:
        pair = f"{len(keyid)}:{keyid}{nonce}".encode()
        digest = hashlib.blake2b(pair, digest_size=8, key=self._key).digest()
        return int.from_bytes(digest, "big")

    def remember(self, keyid: str, nonce: str, expires: int, now: int) -> bool:
        """Record `nonce` for `keyid` until `expires` (inclusive).

        True if the nonce is new (it is now remembered); False if it was already seen and has
        not expired, i.e. a replay. Raises `NonceCacheFull` when a new nonce cannot be stored.
        A nonce that has already expired (`expires < now`) is reported new but not stored: the
        caller's expiry check is what refuses it.
        """
        pair = self._hash(keyid, nonce)
        with self._lock:
            self._prune(now)
            if pair in self._expiry:
                return False
            if expires < now:
                return True
            if len(self._expiry) >= self.max_entries:
                raise NonceCacheFull(
                    f"nonce cache holds {self.max_entries} unexpired nonces; try again later"
                )
            group = self._groups.get(expires)
            if group is None:
                group = self._groups[expires] = []
                heapq.heappush(self._due, expires)
            group.append(pair)
            self._expiry[pair] = expires
            return True

    def _prune(self, now: int) -> None:
        due, expiry = self._due, self._expiry
        while due and due[0] < now:
            expires = heapq.heappop(due)
            for pair in self._groups.pop(expires):
                # The pair may have been stored again later with another expiry (only if the
                # caller's clock went backwards); drop the mapping only if it is this group's.
                if expiry.get(pair) == expires:
                    del expiry[pair]
