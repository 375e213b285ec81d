"""The system calls a request costs the node, for two builds side by side: the checkout (B)
and a git revision (A), served as `bench.ab` serves them (one aiohttp mock, nothing pinned).
Each round, for each build in turn: `strace -f -c` on the node's process while wrk sends
requests at concurrency 32, each call's count divided by the requests served. strace slows
every call down, so its wall-clock figures mean nothing; the counts are what a change of
the node's own work shows where a latency or throughput difference is within the machine's
noise (a transaction fewer, a wake-up of another thread fewer).

    python -m bench.syscalls --base main [--rounds 2] [--seconds 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time

from bench.ab import AB, BUILDS
from bench.loadgen import run_wrk
from bench.run import HERE


def counts(strace_summary: str) -> dict[str, int]:
    """`strace -c`'s table: calls per system call."""
    found: dict[str, int] = {}
    for line in strace_summary.splitlines():
        parts = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        named = len(parts) >= 5 and parts[-1].isidentifier() and parts[-1] != "total"
        if named and parts[3].isdigit():
            found[parts[-1]] = int(parts[3])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the git revision to compare against")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--top", type=int, default=10, help="the calls shown, most first")
    args = parser.parse_args()
    strace = shutil.which("strace")
    if strace is None:
        raise SystemExit("strace is not installed (apt-get install strace)")
    os.chdir(HERE.parent)
    bench = AB(args.base, HERE / "results-ab.json")
    per_request: dict[str, list[dict[str, float]]] = {b: [] for b in BUILDS}
    try:
        bench.setup()
        for _ in range(args.rounds):
            for build in BUILDS:
                pid = bench.nodes[build].process.pid  # type: ignore[union-attr]
                tracer = subprocess.Popen(
                    [strace, "-f", "-c", "-p", str(pid)], stderr=subprocess.PIPE, text=True
                )
                time.sleep(0.5)  # strace attaches to every thread before the load starts
                run = run_wrk(bench.targets[build], 32, args.seconds, None, bench.work)
                tracer.terminate()
                _, summary = tracer.communicate(timeout=30)
                calls = counts(summary)
                per_request[build].append({k: v / run.requests for k, v in calls.items()})
                bench.say(f"{build}: {run.requests} requests under strace")
    finally:
        bench.close()
    print(f"A = {args.base}, B = the checkout; system calls a request at c=32, per round")
    names = sorted(
        {name for rounds in per_request.values() for r in rounds for name in r},
        key=lambda name: -max(r.get(name, 0) for rs in per_request.values() for r in rs),
    )[: args.top]
    for build in BUILDS:
        for r in per_request[build]:
            total = sum(r.values())
            shown = " ".join(f"{name} {r.get(name, 0):.2f}" for name in names)
            print(f"  {build}: all {total:.2f}; {shown}")


if __name__ == "__main__":
    main()
