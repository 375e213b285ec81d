"""Two builds of the node against each other, interleaved on the same machine in the same
minutes: the checkout (B) and a git revision (A, `--base`, exported with `git archive` into
the work folder and put first on the node's PYTHONPATH). Both serve a copy of one node (same
identity and key, own database, `--workers 1`) in front of one aiohttp mock, nothing pinned,
as in the unpinned mode; every request carries the virtual key with a budget and limits.

Each round, in shuffled order: wrk at concurrency 32 (req/s, and the node's CPU per request
from bench/cores.py), then sequential requests from httpx (p50 and p99 of the latency), then
streamed ones (time to the first byte), then complete ones each asked after the idle that a
stream's events leave between them (p50: what a first byte is to be read against). The
figures are B's over A's within each round, medians over the rounds: on a shared machine
compare these ratios, not the times.

    python -m bench.ab --base acdd6bb [--rounds 6] [--seconds 3]

`--python-a` and `--python-b` run each build's node on another interpreter (a virtualenv made
from the same lock), so that `--base HEAD --python-b /path/venv313/bin/python` measures an
interpreter's upgrade alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench import procs
from bench.cores import Meter
from bench.loadgen import Target, percentile, run_wrk
from bench.run import BUDGET, FULL, HERE, RATE_LIMITS, Bench, Node, _dd, free_port
from bench.unpinned import _streamed, after_idle, first_bytes, sequential

BUILDS = ("A", "B")


class AB(Bench):
    def __init__(self, base: str, output: Path, pythons: dict[str, str] | None = None) -> None:
        super().__init__(FULL, output, keep=False)
        self.base = base
        # Each build's interpreter, a command (`--python-a`, `--python-b`): this one's unless told.
        self.pythons = pythons or dict.fromkeys(BUILDS, sys.executable)
        self.node_cpus = self.client_cpus = None

    def setup(self) -> None:
        old = self.work / "base"
        old.mkdir()
        archive = subprocess.run(
            ["git", "archive", self.base], cwd=HERE.parent, capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
        self.mock_port = free_port()
        mock = [sys.executable, "-m", "bench.mock_aiohttp", "--port", str(self.mock_port)]
        self.mock = self.spawn("mock", mock, None)
        a = Node("alpha", self.work / "alpha", free_port())
        self.finish(self.cli("init", "--name", "alpha", "--data-dir", str(a.directory)))
        self._configure(a, with_mock=True)
        made = self.cli(
            "keys", "create", "--name", "bench", *BUDGET, *RATE_LIMITS, "--json", *_dd(a)
        )
        key = json.loads(self.finish(made)[0])["key"]
        b = self._copy(a, "alpha-b")
        self.nodes = {"A": a, "B": b}
        for build, node in self.nodes.items():
            # `python -m` puts its working folder first on sys.path, before PYTHONPATH: each
            # build runs in its own tree, or A would import the checkout's modules.
            env = self.env() | ({"PYTHONPATH": str(old)} if build == "A" else {})
            command = [*shlex.split(self.pythons[build]), "-m", "node.cli", "serve", *_dd(node)]
            command += ["--port", str(node.port), "--workers", "1"]
            log = self.work / f"{build}.log"
            tree = old if build == "A" else HERE.parent
            node.process = procs.spawn(command, cpus=None, log=log, env=env, cwd=tree)
            self.processes.append(node.process)
        self.targets = {build: node.target(build, key) for build, node in self.nodes.items()}
        for build, node in self.nodes.items():
            self.wait_answer(self.targets[build], node.process, 90)
        self.say(f"A = {self.base} (git archive), B = the checkout; both answer; {self.pythons}")

    def compare(self, rounds: int, seconds: float) -> dict[str, list[float]]:
        found: dict[str, dict[str, list[float]]] = {b: {} for b in BUILDS}
        clients = {b: httpx.Client(timeout=30) for b in BUILDS}
        streams = {
            b: Target(t.name, t.host, t.port, t.path, _streamed(t.body), t.headers)
            for b, t in self.targets.items()
        }
        try:
            for build in BUILDS:
                sequential(clients[build], self.targets[build], 0.5)
            for i, order in enumerate(self.rounds(rounds, BUILDS)):
                for build in order:
                    b = str(build)
                    node = self.nodes[b].process.pid  # type: ignore[union-attr]
                    with Meter({"node": [node], "mock": [self.mock.pid]}).run() as split:
                        run = run_wrk(self.targets[b], 32, seconds, None, self.work)
                        split.requests = run.requests
                    times = sequential(clients[b], self.targets[b], seconds)
                    firsts = first_bytes(clients[b], streams[b], 20)
                    idle = after_idle(clients[b], self.targets[b], 20, FULL.chunk_gap_ms / 1000)
                    for name, value in (
                        ("rps", run.rps),
                        ("cpu_us", split.groups["node"].cpu_us),
                        ("p50_ms", percentile(times, 0.5)),
                        ("p99_ms", percentile(times, 0.99)),
                        ("ttfb_ms", percentile(firsts, 0.5)),
                        ("idle_p50_ms", percentile(idle, 0.5)),
                    ):
                        found[b].setdefault(name, []).append(value)
                self.say(
                    f"round {i}: "
                    + "; ".join(
                        f"{b} {found[b]['rps'][-1]:,.0f} req/s {found[b]['cpu_us'][-1]:,.0f} "
                        f"us/req p50 {found[b]['p50_ms'][-1]:.2f} ms"
                        for b in BUILDS
                    )
                )
        finally:
            for client in clients.values():
                client.close()
        return {f"{b}_{name}": values for b in BUILDS for name, values in found[b].items()} | {
            f"B_over_A_{name}": [
                y / x for x, y in zip(found["A"][name], found["B"][name], strict=True) if x
            ]
            for name in found["A"]
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the git revision to compare against")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--output", type=Path, default=HERE / "results-ab.json")
    for build in BUILDS:
        parser.add_argument(
            f"--python-{build.lower()}",
            default=sys.executable,
            help=f"the interpreter of build {build}'s node (a command: bench/gc_watch.py says why)",
        )
    args = parser.parse_args()
    os.chdir(HERE.parent)
    pythons = {build: getattr(args, f"python_{build.lower()}") for build in BUILDS}
    bench = AB(args.base, args.output, pythons)
    try:
        load = os.getloadavg()
        bench.setup()
        with bench.phase("compare"):
            figures = bench.compare(args.rounds, args.seconds)
        after = os.getloadavg()
    finally:
        bench.close()
    lines = [f"A = {args.base}, B = the checkout; medians over {args.rounds} rounds"]
    lines += [f"  {build}'s interpreter: {python}" for build, python in pythons.items()]
    for name, values in figures.items():
        lines.append(
            f"  {name}: {statistics.median(values):.3f} ({min(values):.3f}..{max(values):.3f})"
        )
    lines.append(
        f"load average {load[0]:.2f} -> {after[0]:.2f}; other programs used "
        f"{bench.background['compare']:.2f} cores"
    )
    print("\n".join(lines))
    args.output.write_text(
        json.dumps(
            {
                "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "base": args.base,
                "pythons": pythons,
                "figures": {k: [round(v, 4) for v in vs] for k, vs in figures.items()},
                "background_cpu_cores": round(bench.background["compare"], 3),
                "load": [round(load[0], 2), round(after[0], 2)],
                "text": "\n".join(lines),
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
