"""The measurements of a scale run, each a function of the running cluster answering a dict
of numbers for the table and bench/scale-results.json."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import httpx
import msgspec

from bench.scale.cluster import MODEL, Cluster, model_toml
from bench.scale.probes import chat, converge, cpu_seconds, offers, rss_mib

Result = dict[str, Any]
PROVIDER, BACKUP = 0, 1
NEW_MODEL = "scale-new"


def _spread(times: list[float | None]) -> Result:
    got = [t for t in times if t is not None]
    return {
        "peers": len(times),
        "reached": len(got),
        "p50_s": round(statistics.median(got), 3) if got else None,
        "p100_s": round(max(got), 3) if got else None,
    }


def _restart(cluster: Cluster, index: int, extra: str) -> float:
    """Change a node's models (its config) and restart it: the only way a model or a price
    changes today. Answers the seconds the restart took."""
    started = time.monotonic()
    cluster.set_models(index, extra)
    cluster.stop_one(index)
    cluster.start([index])
    return time.monotonic() - started


def convergence(cluster: Cluster, watchers: list[int], timeout: float) -> Result:
    """Add a model, change its price, remove it (config + restart), and narrow one peer's key
    to another model (live, no restart): seconds until every watcher lists the change."""
    of = cluster.nodes[PROVIDER].node_id()
    base = model_toml(1_000_000, 2_000_000)
    out: Result = {}
    steps = [
        ("add", base + model_toml(3_000_000, 3_000_000, NEW_MODEL), lambda v: offers(v, NEW_MODEL)),
        (
            "price",
            base + model_toml(4_000_000, 4_000_000, NEW_MODEL),
            lambda v: offers(v, NEW_MODEL, 4_000_000),
        ),
        ("remove", base, lambda v: offers(v, MODEL) and not offers(v, NEW_MODEL)),
    ]
    for name, extra, seen in steps:
        restart = _restart(cluster, PROVIDER, extra)
        out[name] = _spread(asyncio.run(converge(cluster, watchers, of, seen, timeout)))
        out[name]["restart_s"] = round(restart, 3)
    out["key_models"] = key_change(cluster, watchers[-1], timeout)
    return out


def _peer_key_id(cluster: Cluster, issuer: int, joiner: int) -> str:
    keys = msgspec.json.decode(
        cluster.cli(["keys", "list", "--json", *cluster.nodes[issuer].data_dir_args()])
    )
    name = f"peer:{cluster.nodes[joiner].name}"
    return next(key["id"] for key in keys if key["name"] == name)


def key_change(cluster: Cluster, watcher: int, timeout: float) -> Result:
    """Narrow the watcher's key at the provider to the embeddings model, then widen it back:
    seconds until the watcher stops, then starts again, listing the chat model."""
    of = cluster.nodes[PROVIDER].node_id()
    key_id = _peer_key_id(cluster, PROVIDER, watcher)
    args = cluster.nodes[PROVIDER].data_dir_args()
    out: Result = {}
    for name, models, seen in (
        ("narrowed", "echo-embed", lambda v: v is not None and not offers(v, MODEL)),
        ("widened", "none", lambda v: offers(v, MODEL)),
    ):
        cluster.cli(["keys", "update", key_id, "--models", models, *args])
        out[name] = _spread(asyncio.run(converge(cluster, [watcher], of, seen, timeout)))
    return out


def revocation(cluster: Cluster, revoked: int, timeout: float) -> Result:
    """The provider revokes one peer: seconds after `peers revoke` returns until that peer's
    next request pinned to the provider is refused, and until it stops listing its models."""
    of = cluster.nodes[PROVIDER].node_id()
    pinned = f"{MODEL}@{cluster.nodes[PROVIDER].name}"

    async def refused(started: float) -> float | None:
        async with httpx.AsyncClient(timeout=15) as client:
            while time.monotonic() - started < timeout:
                if await chat(client, cluster, revoked, pinned) != 200:
                    return time.monotonic() - started
                await asyncio.sleep(0.01)
        return None

    async def both() -> tuple[float | None, list[float | None]]:
        started = time.monotonic()
        return await asyncio.gather(
            refused(started),
            converge(cluster, [revoked], of, lambda v: not offers(v, MODEL), timeout),
        )

    assert asyncio.run(_one_ok(cluster, revoked, pinned)) == 200, "the peer is not served first"
    cluster.cli(
        ["peers", "revoke", cluster.nodes[revoked].name, *cluster.nodes[PROVIDER].data_dir_args()]
    )
    request, listing = asyncio.run(both())
    return {
        "request_refused_s": None if request is None else round(request, 3),
        "unlisted_s": listing[0] if listing[0] is None else round(listing[0], 3),
    }


async def _one_ok(cluster: Cluster, at: int, model: str) -> int:
    async with httpx.AsyncClient(timeout=15) as client:
        return await chat(client, cluster, at, model)


def idle_traffic(cluster: Cluster, seconds: float, degree: dict[int, int]) -> Result:
    """Bytes and requests through the relays (every byte between nodes) and in the nodes'
    access logs over `seconds` of idling: per node, and per node per peer."""
    before, lines_before = (
        cluster.relay_counts(),
        [len(cluster.access_lines(i)) for i in range(cluster.count)],
    )
    cpu_before, wall = cpu_seconds(cluster.pid(PROVIDER)), time.monotonic()
    time.sleep(seconds)
    after = cluster.relay_counts()
    elapsed = time.monotonic() - wall
    cpu = (cpu_seconds(cluster.pid(PROVIDER)) - cpu_before) / elapsed
    paths: dict[str, int] = {}
    for index in range(cluster.count):
        for entry in cluster.access_lines(index)[lines_before[index] :]:
            path = str(entry.get("path", "?")).split("?")[0]
            paths[path] = paths.get(path, 0) + 1
    moved = sum(after[i][0] + after[i][1] - before[i][0] - before[i][1] for i in after)
    requests = sum(paths.values())
    # Every byte and request between nodes is sent by one and received by another: a node's
    # share of sent + received is twice the total over the number of nodes.
    per_node_bytes = 2 * moved / cluster.count / elapsed
    per_node_requests = 2 * requests / cluster.count / elapsed
    mean_degree = sum(degree.values()) / cluster.count
    # What the provider's peers ask of it and it answers (its relay's bytes): in a star, where
    # it holds no peer's key and so asks nothing, that is all of its traffic.
    provider = sum(after[PROVIDER][:2]) - sum(before[PROVIDER][:2])
    return {
        "provider_bytes_s": round(provider / elapsed, 1),
        "provider_bytes_peer_s": round(provider / elapsed / degree[PROVIDER], 1),
        "seconds": round(elapsed, 1),
        "bytes_per_node_s": round(per_node_bytes, 1),
        "bytes_per_node_peer_s": round(per_node_bytes / mean_degree, 1),
        "requests_per_node_s": round(per_node_requests, 3),
        "requests_per_node_peer_s": round(per_node_requests / mean_degree, 4),
        "mean_peers": round(mean_degree, 2),
        "by_path": paths,
        "provider_cpu_pct": round(cpu * 100, 2),
        "provider_rss_mib": round(rss_mib(cluster.pid(PROVIDER)), 1),
        "provider_peers": degree[PROVIDER],
    }


def load(cluster: Cluster, seconds: float, concurrency: int) -> Result:
    """The provider under a steady load from its own clients: CPU and memory."""

    async def run() -> tuple[int, int]:
        done, failed = 0, 0
        stop = time.monotonic() + seconds
        async with httpx.AsyncClient(timeout=30) as client:

            async def worker() -> None:
                nonlocal done, failed
                while time.monotonic() < stop:
                    if await chat(client, cluster, PROVIDER) == 200:
                        done += 1
                    else:
                        failed += 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done, failed

    pid = cluster.pid(PROVIDER)
    cpu_before, wall = cpu_seconds(pid), time.monotonic()
    done, failed = asyncio.run(run())
    elapsed = time.monotonic() - wall
    return {
        "concurrency": concurrency,
        "requests_s": round(done / elapsed, 1),
        "failed": failed,
        "cpu_pct": round((cpu_seconds(pid) - cpu_before) / elapsed * 100, 1),
        "rss_mib": round(rss_mib(pid), 1),
    }


def dead_peer(cluster: Cluster, consumers: list[int], timeout: float) -> Result:
    """kill -9 the provider while `consumers` (which also joined the backup provider) send
    requests one after another: failed requests per consumer before one succeeds by the
    backup, seconds until each marks it down, and up again after a restart."""
    of = cluster.nodes[PROVIDER].node_id()

    async def traffic(
        stop: asyncio.Event, failures: dict[int, int], after_kill: asyncio.Event
    ) -> None:
        async with httpx.AsyncClient(timeout=30) as client:

            async def one(at: int) -> None:
                while not stop.is_set():
                    status = await chat(client, cluster, at)
                    if after_kill.is_set() and status != 200:
                        failures[at] += 1
                    await asyncio.sleep(0.02)

            await asyncio.gather(*(one(at) for at in consumers))

    async def run() -> tuple[dict[int, int], list[float | None]]:
        failures = {at: 0 for at in consumers}
        stop, after_kill = asyncio.Event(), asyncio.Event()
        task = asyncio.ensure_future(traffic(stop, failures, after_kill))
        await asyncio.sleep(1)
        cluster.kill(PROVIDER)
        after_kill.set()
        down = await converge(
            cluster, consumers, of, lambda v: v is not None and v["healthy"] is False, timeout
        )
        stop.set()
        await task
        return failures, down

    failures, down = asyncio.run(run())
    started = time.monotonic()
    cluster.start([PROVIDER])
    restart = time.monotonic() - started
    up = asyncio.run(
        converge(cluster, consumers, of, lambda v: v is not None and v["healthy"] is True, timeout)
    )
    return {
        "consumers": len(consumers),
        "failed_requests": failures,
        "max_failed_per_consumer": max(failures.values()) if failures else 0,
        "marked_down": _spread(down),
        "restart_s": round(restart, 3),
        "marked_up_after_ready": _spread(up),
    }


def ledger(cluster: Cluster, consumers: list[int], requests: int, concurrency: int) -> Result:
    """Each consumer sends `requests` to the provider (pinned); then each pair reconciles
    and settles (the consumer's `ledger reconcile` / `ledger settle`), and `ledger net` runs
    over every statement."""
    pinned = f"{MODEL}@{cluster.nodes[PROVIDER].name}"

    async def send() -> int:
        failed = 0
        gate = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(
            timeout=60, limits=httpx.Limits(max_connections=concurrency)
        ) as client:

            async def one(at: int) -> None:
                nonlocal failed
                for _ in range(requests):
                    async with gate:
                        if await chat(client, cluster, at, pinned) != 200:
                            failed += 1

            await asyncio.gather(*(one(at) for at in consumers))
        return failed

    started = time.monotonic()
    failed = asyncio.run(send())
    sent_s = time.monotonic() - started
    provider = cluster.nodes[PROVIDER]
    started = time.monotonic()
    for at in consumers:
        cluster.cli(
            ["ledger", "reconcile", provider.name, "--json", *cluster.nodes[at].data_dir_args()]
        )
    reconcile_s = time.monotonic() - started
    started = time.monotonic()
    for at in consumers:
        cluster.cli(
            ["ledger", "settle", provider.name, "--json", *cluster.nodes[at].data_dir_args()]
        )
    settle_s = time.monotonic() - started
    statements = cluster.root / "statements.jsonl"
    statements.write_text(
        "".join(
            cluster.cli(["ledger", "statements", *cluster.nodes[at].data_dir_args()])
            for at in consumers
        )
    )
    started = time.monotonic()
    plan = msgspec.json.decode(
        cluster.cli(["ledger", "net", str(statements), "--json", *provider.data_dir_args()])
    )
    net_s = time.monotonic() - started
    total = len(consumers) * requests
    return {
        "consumers": len(consumers),
        "requests": total,
        "failed": failed,
        "requests_s": round(total / sent_s, 1),
        "reconcile_all_s": round(reconcile_s, 2),
        "settle_all_s": round(settle_s, 2),
        "net_s": round(net_s, 3),
        "transfers": len(plan.get("transfers", [])),
    }
