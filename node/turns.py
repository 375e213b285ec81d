"""Turns of the clock shared by every process of a node (each worker, each host): work that
all of them schedule and one of them does in each turn, the first to claim it in the store."""

from __future__ import annotations

import time

from node.storage.base import Store


async def ours_this_turn(store: Store, name: str, seconds: float) -> bool:
    """Whether this process is the first to claim the current `seconds`-long turn of `name`.
    The interval is in the turn's name: turns counted in another interval (a build before a
    change of it, a config changed back) are another count, never compared with this one (a
    count of larger turns would stay ahead of it for ever)."""
    return await store.peers.claim_turn(f"turn:{name}:{seconds:g}", int(time.time() // seconds))
