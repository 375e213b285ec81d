"""A peer's health is checked once a health interval for the whole node, not once per worker:
a process whose check of a peer falls due takes what another process of the node found
(the store's `peer_health`) when that is a finding of "up" newer than its own and within
most of an interval. With one worker per core, every peer was asked for its advert as many
times as the node has cores. A peer found down is still checked by each process.

Two real `Peering`s over one store, as two workers of a node have; the check itself (the
signed advert fetch) is replaced by its outcome, recorded the way a check records it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from federation.descriptors import make_descriptor
from federation.identity import NodeIdentity
from node.config import Config, FederationSection, NodeSection
from node.peers.peering import JITTER, Peer, Peering
from node.storage import open_store
from node.storage.base import Store
from node.storage.records import PeerRecord

INTERVAL = 30
ALICE = NodeIdentity.generate()


def _worker(store: Store, folder: Path, checks: list[str], up: bool = True) -> Peering:
    """One process's peering, holding alice as a peer; each of its checks is noted in
    `checks` and comes out `up` (or down), saved as a real check saves it."""
    config = Config(
        node=NodeSection(name="bob"), federation=FederationSection(health_interval=INTERVAL)
    )
    peering = Peering(
        config, NodeIdentity.generate(), store, None, None, None, folder, lambda: None
    )  # type: ignore[arg-type]
    descriptor = make_descriptor(ALICE, "alice", ["http://127.0.0.1:9"])
    record = PeerRecord(
        ALICE.node_id, "alice", msgspec.json.encode(descriptor).decode(), "active", 0
    )
    peering.peers = {ALICE.node_id: Peer(record, descriptor, "sk-hub-cross")}

    async def check(peer: Peer) -> bool:
        checks.append(str(id(peering)))
        if up:
            await peering._healthy(peer, 0.004)
        else:
            await peering._unhealthy(peer, "unreachable: ConnectError")
        return up

    peering.refresh_advert = check  # type: ignore[method-assign]
    return peering


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """The node's one store, which its workers share."""
    opened = await open_store(tmp_path / "aihub.db")
    yield opened
    await opened.close()


def _due(peering: Peering) -> Peer:
    peer = peering.peers[ALICE.node_id]
    peer.next_check = 0.0
    return peer


async def test_a_check_one_worker_made_serves_the_others(store: Store, tmp_path: Path) -> None:
    checks: list[str] = []
    one, other = _worker(store, tmp_path, checks), _worker(store, tmp_path, checks)
    _due(one)
    await one.refresh_all()
    assert checks == [str(id(one))]

    # Due at the other worker moments later: it takes the finding instead of asking.
    peer = _due(other)
    started = time.monotonic()
    await other.refresh_all()
    assert checks == [str(id(one))]
    assert peer.healthy and peer.latency == 0.004 and peer.last_seen
    # ... and comes back when an interval from that check is nearly up, not at once.
    assert peer.next_check >= started + INTERVAL * JITTER[0] - 2

    # A finding older than most of an interval is not taken: the other worker asks.
    await store.peers.save_peer_health(ALICE.node_id, True, 4, int(time.time()) - INTERVAL)
    _due(other).last_seen = None
    await other.refresh_all()
    assert checks == [str(id(one)), str(id(other))]


async def test_a_peer_found_down_is_checked_by_every_worker(store: Store, tmp_path: Path) -> None:
    checks: list[str] = []
    one = _worker(store, tmp_path, checks, up=False)
    other = _worker(store, tmp_path, checks)
    _due(one)
    await one.refresh_all()
    assert not one.peers[ALICE.node_id].healthy
    _due(other)
    await other.refresh_all()  # down there is not taken: this worker asks for itself
    assert checks == [str(id(one)), str(id(other))]
    assert other.peers[ALICE.node_id].healthy


async def test_a_worker_that_could_not_reach_a_peer_checks_it_itself(
    store: Store, tmp_path: Path
) -> None:
    """Another worker's "up" does not hide what this one saw: a request it could not get
    through (another host's route, say) has its own check at the next tick."""
    checks: list[str] = []
    one, other = _worker(store, tmp_path, checks), _worker(store, tmp_path, checks)
    _due(one)
    await one.refresh_all()
    other.unreachable(ALICE.node_id)
    await other.refresh_all()
    assert checks == [str(id(one)), str(id(other))]
    # Its own check found it up: from here on it takes the others' findings again (a
    # check of the other's that came after its own, seconds later).
    other.peers[ALICE.node_id].last_seen = time.time() - 5
    _due(one)
    await one.refresh_all()
    _due(other)
    await other.refresh_all()
    assert checks == [str(id(one)), str(id(other)), str(id(one))]
