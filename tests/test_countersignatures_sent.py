"""A consumer's countersignatures reach their provider however many are waiting: every batch
a turn (not one), each provider's apart from the others', and nothing marked sent that the
provider did not take. The receipts are issued, checked, countersigned, kept and checked back
by the node's own code on both sides, each on its own store; only the HTTP between them is a
function call."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from federation.identity import NodeIdentity
from ledger.canonical import b64url
from ledger.receipts import SentRequest
from node.peers import receipts as receipts_module
from node.peers.receipts import Receipts, _Taken
from node.storage.base import Store
from tests.postgres import open_test_store
from tests.test_storage import charge

PROVIDER, OTHER, CONSUMER = (NodeIdentity.generate() for _ in range(3))
PRICE = 10_000_000  # micros per 1M tokens: the test charge's 7 micros are within it


@dataclass
class _Peer:
    node_id: str
    name: str
    url: str
    key: str | None = "sk-hub-cross"


@dataclass
class _Peering:
    """What `Receipts` reads of the peering: the advert seq, the peers, and `signed`, which
    hands a countersignature batch to the provider's own `take_countersignatures` (or
    answers as `answer` says)."""

    providers: dict[str, Receipts] = field(default_factory=dict)
    answer: int | None = None  # a status to answer with instead of the provider's 200
    posts: list[str] = field(default_factory=list)
    advert_seq: int = 1

    @property
    def peers(self) -> dict[str, Any]:
        return {
            node_id: _Peer(node_id, node_id[8:14], f"http://{node_id[8:14]}.test")
            for node_id in self.providers
        }

    async def signed(self, method: str, url: str, key: str | None, body: bytes) -> Any:
        assert method == "POST" and url.endswith("/federation/countersignatures") and key
        node_id = next(i for i in self.providers if url.startswith(f"http://{i[8:14]}."))
        self.posts.append(node_id)
        if self.answer == 0:
            raise httpx.ConnectError("refused")
        if self.answer is not None:
            return httpx.Response(self.answer)
        await self.providers[node_id].take_countersignatures(CONSUMER.node_id, body)
        return httpx.Response(200)


async def _countersigned_by_consumer(
    provider: Receipts, consumer: Receipts, count: int, prefix: str
) -> None:
    """`count` receipts issued by `provider`, taken (checked, countersigned, kept) by
    `consumer`, their countersignatures not yet sent."""
    taken = []
    for n in range(count):
        request_id = f"{prefix}-{n}"
        body = await provider.issue(charge(request_id), CONSUMER.node_id, request_id, "k1")
        sent = SentRequest(request_id, provider.identity.node_id, "m", 1, PRICE, PRICE)
        taken.append(_Taken(sent, b64url(body).encode(), 7))
    kept = await consumer.keep_all([consumer._checked(item, 1) for item in taken])
    assert len(kept.kept) == count


async def _countersigned_at(store: Store, provider: NodeIdentity) -> int:
    rows = await store.ledger.receipts(provider.node_id, CONSUMER.node_id)
    return sum(1 for row in rows if row.csig)


async def _unsent(store: Store, provider: NodeIdentity) -> int:
    return len(
        await store.ledger.unsent_countersignatures(CONSUMER.node_id, provider.node_id, 10**6)
    )


async def _open(
    store_url: str, tmp_path: Path, count: int
) -> tuple[list[Store], _Peering, Receipts]:
    """Two providers' stores (SQLite) and the consumer's (each backend): the consumer's
    holds the countersignatures waiting."""
    stores = [await open_test_store(f"sqlite://{tmp_path / name}.db") for name in "ab"]
    stores.append(await open_test_store(store_url))
    peering = _Peering()
    consumer = Receipts(CONSUMER, stores[2], None, peering)  # type: ignore[arg-type]
    for identity, store in zip((PROVIDER, OTHER), stores, strict=False):
        provider = Receipts(identity, store, None, _Peering())  # type: ignore[arg-type]
        peering.providers[identity.node_id] = provider
        await _countersigned_by_consumer(provider, consumer, count, identity.node_id[8:12])
    return stores, peering, consumer


async def test_every_waiting_batch_goes_in_one_turn(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More than a batch waiting for each of two providers: one turn of the job sends them
    all, each provider its own, and each provider holds every countersignature after it. One
    batch a turn, across providers, left the rest for later turns (a busy consumer fell
    behind for as long as it stayed busy)."""
    monkeypatch.setattr(receipts_module, "COUNTERSIGNATURE_BATCH", 40)
    stores, peering, consumer = await _open(store_url, tmp_path, 100)
    try:
        await consumer.send_countersignatures()
        for identity, store in zip((PROVIDER, OTHER), stores, strict=False):
            assert await _countersigned_at(store, identity) == 100
            assert await _unsent(stores[2], identity) == 0
            assert peering.posts.count(identity.node_id) == 3  # 40 + 40 + 20
        await consumer.send_countersignatures()  # nothing left: nothing sent
        assert len(peering.posts) == 6
    finally:
        for store in stores:
            await store.close()


@pytest.mark.parametrize("answer", [503, 0], ids=["refused", "unreachable"])
async def test_a_provider_that_does_not_take_them_keeps_them_waiting(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: int
) -> None:
    """A provider that answers other than 200, or cannot be reached, is tried once a turn;
    nothing is marked sent, and the next turn sends it all."""
    monkeypatch.setattr(receipts_module, "COUNTERSIGNATURE_BATCH", 40)
    stores, peering, consumer = await _open(store_url, tmp_path, 50)
    try:
        peering.answer = answer
        await consumer.send_countersignatures()
        assert sorted(peering.posts) == sorted([PROVIDER.node_id, OTHER.node_id])
        for identity in (PROVIDER, OTHER):
            assert await _unsent(stores[2], identity) == 50
        peering.answer = None
        await consumer.send_countersignatures()
        for identity, store in zip((PROVIDER, OTHER), stores, strict=False):
            assert await _countersigned_at(store, identity) == 50
            assert await _unsent(stores[2], identity) == 0
    finally:
        for store in stores:
            await store.close()
