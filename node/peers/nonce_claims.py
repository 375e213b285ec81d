"""The durable claims of request signatures' nonces, those asked for while one is being written
claimed together in one transaction.

Each signed request a peer sends is checked against the store before anything is served: the
claim is what refuses a replay sent to another worker process or after a restart. A claim is
one short statement: on SQLite, written on the event loop's thread when the database is free,
it costs ~30 µs of CPU, about what waiting a turn of the loop to gather others costs again
(`bench/nonces.py`), so a claim asked for alone is written at once. Those asked for while one
is in flight (a PostgreSQL round trip; SQLite's thread when another writer holds the
database) are claimed together next, in one transaction (`GroupCommit`), each request still
told whether its own nonce was new (a pair twice in a batch is new at most once: the store's
`claim_nonces` decides).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from node.peers.batches import GroupCommit
from node.storage.base import Store


class _Claim(NamedTuple):
    pair: bytes
    expires: int
    now: int


class NonceClaims:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._batch = GroupCommit(self._claim_all, "nonce-claims")

    async def claim(self, pair: bytes, expires: int, now: int) -> bool:
        """True if `pair` is new (recorded as used until `expires`), False if it is a replay."""
        return await self._batch.ask(_Claim(pair, expires, now))

    async def _claim_all(self, claims: Sequence[_Claim]) -> list[bool]:
        # The earliest clock of the batch's: an expired row is taken over only if it expired
        # for every request in the batch (the signatures' own expiry is checked before).
        now = min(claim.now for claim in claims)
        return await self._store.peers.claim_nonces([(c.pair, c.expires) for c in claims], now)

    async def settle(self) -> None:
        """Wait for the claims being written (at shutdown, and in tests)."""
        await self._batch.settle()
