"""What each peer and we used of each other since our last statement (`aihub ledger
balance`, the admin API, the dashboard). Apart because it reads our own books only, and
`aihub ledger balance` imports it without the reconciliation, settlement or the link."""

from __future__ import annotations

import msgspec

from node.peers.books.period import coverage, stored_pages, unanswered_receipts
from node.peers.receipts import loaded
from node.storage.base import Store


class PairBalance(msgspec.Struct):
    """What one peer and we used of each other since our last settlement (micro-units)."""

    peer: str
    name: str
    we_used: int  # served by them: we owe it
    they_used: int  # served by us: they owe it
    net: int  # positive: they owe us
    receipts: int
    # Of `we_used`: billed for requests whose answers never reached us whole.
    unanswered: int = 0


async def _peer_ids(store: Store, me: str) -> dict[str, str]:
    """Every node we keep books with, by id, with its name."""
    names = {p.node_id: p.name for p in await store.peers.peers(include_revoked=True)}
    for provider, consumer in await store.ledger.receipt_pairs():
        other = consumer if provider == me else provider
        names.setdefault(other, other[:20] + "…")
    return names


async def balance(store: Store, me: str) -> list[PairBalance]:
    return [
        await _balance_with(store, me, peer, name)
        for peer, name in (await _peer_ids(store, me)).items()
    ]


async def _balance_with(store: Store, me: str, peer: str, name: str) -> PairBalance:
    """What each side used since the last statement, summed a page at a time."""
    _, settled = await coverage(store, me, peer)
    used = {me: 0, peer: 0}  # by provider
    count = unanswered = 0
    for provider, consumer in ((me, peer), (peer, me)):
        async for rows in stored_pages(store, provider, consumer, after=settled[provider]):
            receipts = [loaded(row) for row in rows]
            used[provider] += sum(r.amount for r in receipts)
            count += len(receipts)
            if provider == peer:
                unanswered += sum(
                    r.amount for r in await unanswered_receipts(store, peer, receipts)
                )
    we_used, they_used = used[peer], used[me]
    return PairBalance(peer, name, we_used, they_used, they_used - we_used, count, unanswered)
