"""The durable claims of request signatures' nonces, those of one turn of the event loop in one
transaction.

Each signed request a peer sends is checked against the store before anything is served: the
claim is what refuses a replay sent to another worker process or after a restart. At load,
peers' requests come in together; claiming each turn's nonces in one transaction costs about
one commit for all of them (`TurnBatch`), each request still told whether its own nonce was new
(a pair twice in a turn is new at most once: the store's `claim_nonces` decides).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from node.peers.turns import TurnBatch
from node.storage.base import Store


class _Claim(NamedTuple):
    pair: bytes
    expires: int
    now: int


class NonceClaims:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._batch = TurnBatch(self._claim_all, "nonce-claims")

    async def claim(self, pair: bytes, expires: int, now: int) -> bool:
        """True if `pair` is new (recorded as used until `expires`), False if it is a replay."""
        return await self._batch.ask(_Claim(pair, expires, now))

    async def _claim_all(self, claims: Sequence[_Claim]) -> list[bool]:
        # The earliest clock of the turn's: an expired row is taken over only if it expired
        # for every request in the batch (the signatures' own expiry is checked before).
        now = min(claim.now for claim in claims)
        return await self._store.peers.claim_nonces([(c.pair, c.expires) for c in claims], now)

    async def settle(self) -> None:
        """Wait for the claims being written (at shutdown, and in tests)."""
        await self._batch.settle()
