"""Chains re-synced with each peer before this process issues it a receipt, after a restore.

A node's database may be older than what its peers hold: restored from a backup, it lacks the
receipts it signed since, and the next one it issued would carry a seq its consumer already
holds with other contents, which the consumer rightly takes for equivocation and answers by
suspending it. So the node notes which database file it runs on (device and inode: a restored
backup is another file); when the file is not the one it last ran on, every peer is marked
pending (durably), and before the first receipt to a pending peer the node learns its chain
head from the peer's copy (`books.resync`: the receipts beyond ours are signed by our own
key, and statements by us too). A pending peer whose first request comes before that waits
for it, and is refused with a 503 to retry if the node cannot reach it: better no answer than
a receipt that gets the node suspended. Pending peers are also re-synced at start-up in the
background. A peer that is not pending is never re-synced here (our chain head is our own, and
statements whose answers were lost come back with `ledger reconcile` and `settle`): a consumer
the provider cannot reach (behind NAT) is served as before.

Ordinary requests never come here, and a peer's request only tests one set.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx

from federation.identity import NodeIdentity
from ledger.records import RecordError
from node.errors import HubError, Kind
from node.peers.books.errors import BooksError
from node.peers.books.link import link_to
from node.peers.books.resync import resync_with
from node.peers.peering import Peering
from node.storage.base import Store

log = logging.getLogger("aihub.ledger")

RETRY_SECONDS = 5


class ChainResync:
    def __init__(
        self, store: Store, identity: NodeIdentity, client: httpx.AsyncClient, peering: Peering
    ) -> None:
        self.store = store
        self.identity = identity
        self.client = client
        self.peering = peering
        # The peers a restore left to re-sync (`load`); every other peer's chain head is
        # ours already, and its requests never wait: a consumer we cannot reach (behind
        # NAT) is served as before.
        self._pending: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        # After a failed attempt, the peer's requests are refused at once for a while rather
        # than each waiting for another attempt to time out.
        self._retry_at: dict[str, float] = {}

    async def load(self) -> None:
        """Note which database this is; the peers a restore left to re-sync."""
        file_id = await self.store.database_id()  # once, at start-up
        self._pending = await self.store.ledger.pending_resyncs(file_id, self.identity.node_id)
        if self._pending:
            log.warning(
                "this database is not the file the node last ran on (a restored backup?):"
                " %d peers' chains are re-synced from their copies before they are served",
                len(self._pending),
            )

    def synced(self, peer: str) -> bool:
        return peer not in self._pending

    async def ensure(self, peer: str) -> None:
        """Return once our chain to `peer` is re-synced in this process; unavailable if it
        cannot be now (the peer retries)."""
        if peer not in self._pending:
            return
        lock = self._locks.setdefault(peer, asyncio.Lock())
        async with lock:
            if peer not in self._pending:
                return
            if time.monotonic() < self._retry_at.get(peer, 0.0):
                raise _not_synced()
            try:
                await self._resync(peer)
            except (BooksError, httpx.HTTPError, RecordError) as exc:
                log.warning("could not re-sync our chain with %s: %s", peer, _said(exc))
                self._retry_at[peer] = time.monotonic() + RETRY_SECONDS
                raise _not_synced() from exc

    async def _resync(self, peer: str) -> None:
        link = await link_to(self.store, self.identity, self.client, peer)
        result = await resync_with(self.store, link)
        if result.receipts or result.statements:
            log.warning(
                "re-synced with %s: recovered %d receipts and %d statements its copy held"
                " (a restored backup?); our chain continues after seq %d",
                link.peer.name,
                result.receipts,
                result.statements,
                result.head,
            )
        await self.store.ledger.resynced(peer)
        self._pending.discard(peer)

    async def all(self) -> None:
        """Re-sync with every active peer a restore left pending (at start-up, off the
        request path); one that does not answer is re-synced on its first request."""
        for peer in [p for p in self._pending if p in self.peering.peers]:
            try:
                await self.ensure(peer)
            except HubError:
                continue


def _not_synced() -> HubError:
    return HubError(
        Kind.UNAVAILABLE,
        "This node has not yet re-synced its ledger with yours and cannot reach your node to"
        " do so; try again",
        code="ledger_not_synced",
        retry_after=RETRY_SECONDS,
    )


def _said(exc: Exception) -> str:
    return exc.message if isinstance(exc, BooksError) else f"{type(exc).__name__}: {exc}"
