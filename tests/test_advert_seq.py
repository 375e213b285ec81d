"""The advert seq a node issues at each start is above every seq it issued before, even when
it restarts within the same second of the clock: peers keep an advert only if its seq is
above the last one they saw, so a repeated seq left them on the old advert (the old model
list) until their next refresh, an hour later by default."""

from __future__ import annotations

import time

import pytest

from node.peers.peering import Peering
from node.storage import open_store

A_SECOND = 1_800_000_000.0


def _started_seq_keeper(store: object) -> Peering:
    # Only what `_next_seq` reads: the store, and the seq this process issued last.
    peering = Peering.__new__(Peering)
    peering.store = store  # type: ignore[assignment]
    peering.advert_seq = 0
    return peering


async def test_a_restart_within_the_same_second_issues_a_higher_seq(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "time", lambda: A_SECOND)
    store = await open_store(tmp_path / "node.db")
    try:
        seqs = []
        for _ in range(3):  # three starts of the node's processes, the clock standing still
            peering = _started_seq_keeper(store)
            await peering._next_seq()
            seqs.append(peering.advert_seq)
        assert seqs[0] >= int(A_SECOND)
        assert seqs == sorted(set(seqs)), seqs
    finally:
        await store.close()


@pytest.mark.parametrize("back", [1, 3600])
async def test_a_clock_set_back_still_issues_a_higher_seq(tmp_path, monkeypatch, back):
    store = await open_store(tmp_path / "node.db")
    try:
        monkeypatch.setattr(time, "time", lambda: A_SECOND)
        first = _started_seq_keeper(store)
        await first._next_seq()
        monkeypatch.setattr(time, "time", lambda: A_SECOND - back)
        second = _started_seq_keeper(store)
        await second._next_seq()
        assert second.advert_seq > first.advert_seq
    finally:
        await store.close()
