"""What the harness asks the nodes (over HTTP, on their internal ports, with their admin keys)
and reads of their processes: peers as they see them, requests through them, CPU and memory."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench.scale.cluster import MODEL, Cluster

PeerView = dict[str, Any]
Seen = Callable[[PeerView | None], bool]
POLL = 0.05


async def peer_view(
    client: httpx.AsyncClient, cluster: Cluster, at: int, of: str
) -> PeerView | None:
    """How node `at` sees the node with id `of` (`GET /admin/peers`), None if not listed."""
    node = cluster.nodes[at]
    response = await client.get(
        node.url + "/admin/peers", headers={"authorization": f"Bearer {cluster.keys[at]}"}
    )
    response.raise_for_status()
    for peer in response.json()["data"]:
        if peer["node_id"] == of:
            return peer
    return None


def offers(view: PeerView | None, model: str, price_in: int | None = None) -> bool:
    """Whether the peer's advert, as a node sees it, lists `model` (at `price_in`)."""
    if view is None or view["status"] != "active" or view["advert"] is None:
        return False
    return any(
        m["id"] == model and (price_in is None or m["price_in"] == price_in)
        for m in view["advert"]["models"]
    )


async def converge(
    cluster: Cluster, watchers: list[int], of: str, seen: Seen, seconds: float
) -> list[float | None]:
    """Seconds from now until each watcher's view of `of` satisfies `seen` (None: not within
    `seconds`). Every watcher is polled every POLL seconds, all at once."""
    started = time.monotonic()
    found: dict[int, float] = {}
    async with httpx.AsyncClient(timeout=10) as client:

        async def watch(at: int) -> None:
            while time.monotonic() - started < seconds:
                try:
                    if seen(await peer_view(client, cluster, at, of)):
                        found[at] = time.monotonic() - started
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(POLL)

        await asyncio.gather(*(watch(at) for at in watchers))
    return [found.get(at) for at in watchers]


async def chat(client: httpx.AsyncClient, cluster: Cluster, at: int, model: str = MODEL) -> int:
    """One chat request to node `at` with its admin key: the status (0: no answer)."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    try:
        response = await client.post(
            cluster.nodes[at].url + "/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {cluster.keys[at]}"},
        )
    except httpx.HTTPError:
        return 0
    return response.status_code


def _children(pid: int) -> list[int]:
    found = [pid]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if int(fields[1]) == pid:
            found += _children(int(entry.name))
    return found


def cpu_seconds(pid: int) -> float:
    """User and system CPU of the process and its children (workers), in seconds."""
    total = 0
    for each in _children(pid):
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    total = 0
    for each in _children(pid):
        try:
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024
