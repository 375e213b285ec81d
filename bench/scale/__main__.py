"""`python -m bench.scale [--nodes N] [--topology star|random|chain] …` (`make scale`)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from bench.scale import scenarios
from bench.scale.cluster import Cluster, Intervals, joins_for
from bench.scale.report import table

RESULTS = Path(__file__).resolve().parent.parent / "scale-results.json"
DEAD_PEER_CONSUMERS = 5


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--topology", choices=("star", "random", "chain"), default="star")
    parser.add_argument("--seed", type=int, default=19, help="of the random topology")
    parser.add_argument("--requests", type=int, default=1000, help="per consumer (ledger)")
    parser.add_argument("--concurrency", type=int, default=16, help="of the ledger's requests")
    parser.add_argument(
        "--health-interval", type=int, default=30, help="seconds (default: the node's)"
    )
    parser.add_argument(
        "--reconcile-interval", type=int, default=3600, help="seconds (the node's default)"
    )
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idle traffic measured")
    parser.add_argument("--timeout", type=float, default=120.0, help="per convergence, seconds")
    parser.add_argument("--base-port", type=int, default=9100)
    parser.add_argument(
        "--dir", type=Path, help="where the nodes' folders go (default: a temporary one)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the folders after the run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args()


def main() -> None:
    args = arguments()
    if args.nodes < 3:
        raise SystemExit("--nodes: at least 3 (a provider, its backup and a consumer)")
    root = args.dir or Path(tempfile.mkdtemp(prefix="aihub-scale-"))
    intervals = Intervals(health=args.health_interval, reconcile=args.reconcile_interval)
    cluster = Cluster(root, args.nodes, args.base_port, intervals)
    pairs = joins_for(args.topology, args.nodes, args.seed)
    consumers = sorted({j for j, i in pairs if i == scenarios.PROVIDER})
    # In a chain only node 1 (the backup itself) joined node 0: it is watched, with nothing
    # to fall back to.
    fallback = [c for c in consumers if c != scenarios.BACKUP][:DEAD_PEER_CONSUMERS] or consumers
    # (A node never joins itself: in a chain the backup is its own only watcher.)
    pairs += [
        (c, scenarios.BACKUP)
        for c in fallback
        if c != scenarios.BACKUP and (c, scenarios.BACKUP) not in pairs
    ]
    results: dict[str, object] = {
        "nodes": args.nodes,
        "topology": args.topology,
        "joins": len(pairs),
        "intervals": {"health_s": intervals.health, "reconcile_s": intervals.reconcile},
        "requests_per_consumer": args.requests,
        "machine": f"{platform.node()}: {os.cpu_count()} cores, shared with other work",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # What else ran on the machine shows in its load: the figures are read against it.
    load_at_start = os.getloadavg()[0]
    # Peers of each node: a pair that joined each other both ways is one pair of peers.
    degree = {i: 0 for i in range(args.nodes)}
    for pair in {frozenset(pair) for pair in pairs}:
        for node in pair:
            degree[node] += 1
    try:
        say(f"creating {args.nodes} nodes in {root}")
        cluster.create()
        cluster.start_relay()
        started = time.monotonic()
        cluster.start()
        results["start_all_s"] = round(time.monotonic() - started, 2)
        say(f"joining ({len(pairs)} invites, {args.topology})")
        started = time.monotonic()
        for joiner, issuer in pairs:
            cluster.join(joiner, issuer)
        results["join_all_s"] = round(time.monotonic() - started, 2)
        watchers = consumers
        say("idle traffic")
        results["idle"] = scenarios.idle_traffic(cluster, args.idle, degree)
        say("under load")
        results["load"] = scenarios.load(cluster, 10.0, 8)
        say("advert convergence")
        results["convergence"] = scenarios.convergence(cluster, watchers, args.timeout)
        say("a dead peer")
        results["dead_peer"] = scenarios.dead_peer(cluster, fallback, args.timeout)
        say(f"ledger ({args.requests} requests per consumer)")
        results["ledger"] = scenarios.ledger(cluster, consumers, args.requests, args.concurrency)
        say("revocation")  # last: the revoked peer is one of the ledger's consumers
        results["revocation"] = scenarios.revocation(cluster, watchers[-1], args.timeout)
    except BaseException:
        args.keep = True  # the nodes' logs say what went wrong
        say(f"failed: the nodes' folders and logs are kept in {root}")
        raise
    finally:
        cluster.stop()
        if not args.keep and args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
        results["load_average"] = f"{load_at_start:.1f} / {os.getloadavg()[0]:.1f}"
        # What was measured is kept even if a later step failed.
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwritten: {args.out}")


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


if __name__ == "__main__":
    main()
