"""The federated hop through real running nodes, nothing pinned, for an A/B of a change to it:
the aiohttp mock, alpha serving it and beta joined to alpha (as the unpinned mode starts
them), and four arms in shuffled rounds: direct to the mock, one node (client → alpha →
mock), the hop (client → beta → alpha → mock) and the chain (the same two nodes with no
federation between them: beta serving alpha as an ordinary OpenAI-compatible upstream, so
that hop - chain is what the federation itself adds), sequential requests from httpx over
keep-alive. Alongside the latencies, the CPU each node spent per hop request (every thread,
from the scheduler), which the machine's load disturbs far less than latency.

    .venv/bin/python -m bench.hop_live                  # 8 rounds of 2 s
    .venv/bin/python -m bench.hop_live --profile 8      # and py-spy on both nodes in the hop

A before/after in the same minutes: `git archive REV | tar -x -C /tmp/old`, then run this
file with `PYTHONPATH=/tmp/old` (the nodes it starts import the old code) and without,
alternately; compare the ratios and the CPU figures, not the absolute times.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import httpx

from bench import procs
from bench.loadgen import percentile, run_wrk
from bench.run import (
    BUDGET,
    QUICK,
    RATE_LIMITS,
    Bench,
    Settings,
    _dd,
    free_port,
    plain_target,
)
from bench.unpinned import sequential

ARMS = ("direct", "node", "chain", "hop")
# The chain arm: beta serves a model of its own, `chain`, whose upstream is alpha's
# OpenAI-compatible endpoint under an ordinary virtual key of alpha's (this variable holds it):
# the hop's two node passes and process crossings without the federation (no signature, no
# nonce, no receipt), so that hop - chain is what the federation itself adds to the latency.
CHAIN_KEY_ENV = "BENCH_CHAIN_KEY"


class LiveHop(Bench):
    """The mock, alpha and beta, unpinned; Bench's plumbing."""

    chain_key = ""

    def env(self) -> dict[str, str]:
        return {**super().env(), CHAIN_KEY_ENV: self.chain_key}

    def setup(self) -> None:
        self.mock_port = free_port()
        mock = [sys.executable, "-m", "bench.mock_aiohttp", "--port", str(self.mock_port)]
        self.mock = self.spawn("mock", mock, None)
        self._make_pair()
        limits = [*BUDGET, *RATE_LIMITS]
        key_a, key_b, token = self.finish(
            self.cli("keys", "create", "--name", "bench", *limits, "--json", *_dd(self.a)),
            self.cli("keys", "create", "--name", "bench", *limits, "--json", *_dd(self.b)),
            self.cli("invite", "create", "--cap", "1000000", "--uses", "1", *_dd(self.a)),
        )
        self.chain_key = json.loads(key_a)["key"]
        with (self.b.directory / "config.toml").open("a") as config:
            config.write(
                '\n[[models]]\nname = "chain"\nprovider = "openai"\nmodel = "mock"\n'
                f'base_url = "http://127.0.0.1:{self.a.port}/v1"\n'
                f'api_key_env = "{CHAIN_KEY_ENV}"\nprice_in = 150_000\nprice_out = 600_000\n'
            )
        self._serve(self.a, None, "--workers", "1")
        self._serve(self.b, None, "--workers", "1")
        b_key = json.loads(key_b)["key"]
        self.targets = {
            "direct": plain_target("direct", self.mock_port),
            "node": self.a.target("node", json.loads(key_a)["key"]),
        }
        self.wait_answer(self.targets["direct"], self.mock, 30)
        self.wait_answer(self.targets["node"], self.a.process, 90)
        self.wait_answer(self.b.target("beta", b_key, "echo"), self.b.process, 90)
        self.targets["chain"] = self.b.target("chain", b_key, "chain")
        self.wait_answer(self.targets["chain"], self.b.process, 30)
        self.finish(self.cli("join", token.strip(), *_dd(self.b)))
        self.targets["hop"] = self.b.target("hop", b_key)
        self.wait_answer(self.targets["hop"], self.b.process, 30)

    def measure(self, rounds: int, seconds: float) -> dict[str, object]:
        """Each arm's (p50, p99) per round, and each node's CPU per hop request per round."""
        seq: dict[str, list[tuple[float, float]]] = {arm: [] for arm in ARMS}
        cpu: dict[str, list[float]] = {
            "alpha": [],
            "beta": [],
            "node": [],
            "alpha (chain)": [],
            "beta (chain)": [],
        }
        clients = {arm: httpx.Client(timeout=30) for arm in ARMS}
        try:
            for arm in ARMS:
                sequential(clients[arm], self.targets[arm], 0.5)  # connect and warm
            for order in self.rounds(rounds, ARMS):
                for arm in map(str, order):
                    meters = self._meters(arm)
                    times = sequential(clients[arm], self.targets[arm], seconds)
                    for name, meter in meters.items():
                        cpu[name].append(meter.stop()[0] / len(times) * 1e6)
                    seq[arm].append((percentile(times, 0.5), percentile(times, 0.99)))
        finally:
            for client in clients.values():
                client.close()
        figures = _figures(seq, cpu)
        figures |= self.idle(seconds)
        return figures

    def throughput(self, rounds: int, seconds: float) -> dict[str, object]:
        """wrk at 32 connections on one node and on the hop, alternately: req/s, and each
        node's CPU per request."""
        rps: dict[str, list[float]] = {"node": [], "hop": []}
        cpu: dict[str, list[float]] = {"alpha": [], "beta": [], "node": []}
        for order in self.rounds(rounds, ("node", "hop")):
            for arm in map(str, order):
                meters = self._meters(arm)
                run = run_wrk(self.targets[arm], 32, seconds, None, self.work)
                if run.errors:
                    raise RuntimeError(f"{arm}: {run.errors} errors at c=32")
                for name, meter in meters.items():
                    cpu[name].append(meter.stop()[0] / max(run.requests, 1) * 1e6)
                rps[arm].append(run.rps)
        ratio = [h / n for h, n in zip(rps["hop"], rps["node"], strict=True)]
        out: dict[str, object] = {f"{arm}: req/s at c=32": _spread(v) for arm, v in rps.items()}
        out["beta's countersignatures not sent, a turn after the last round"] = self.unsent()
        out["hop's req/s / one node's, c=32"] = _spread(ratio)
        for name, values in cpu.items():
            arm = "one node's" if name == "node" else "hop"
            out[f"{name}: CPU us per {arm} request, c=32"] = _spread(values)
        return out

    def unsent(self) -> int:
        """How many of beta's countersignatures of alpha's receipts wait to be sent, once
        beta's job (every 2 s) has had a turn after the load: what a consumer that cannot
        keep up with its own countersigning leaves behind."""
        time.sleep(2.5)
        with sqlite3.connect(f"file:{self.b.directory / 'aihub.db'}?mode=ro", uri=True) as db:
            # Beta is only ever a consumer here: every receipt it holds is alpha's to it.
            (count,) = db.execute(
                "SELECT COUNT(*) FROM receipts WHERE csig IS NOT NULL AND csig_sent = 0"
            ).fetchone()
        return int(count)

    def idle(self, seconds: float) -> dict[str, object]:
        """What each node spends with nothing asked of it (its scheduled jobs, heartbeats):
        CPU µs per second, which a slower arm pays more of per request."""
        meters = self._meters("hop")
        time.sleep(seconds)
        return {
            f"{name}: idle CPU us per second": meter.stop()[0] / seconds * 1e6
            for name, meter in meters.items()
        }

    def _meters(self, arm: str) -> dict[str, procs.CpuMeter]:
        """CPU meters, started: alpha and beta for the hop, alpha as "node" for the node."""
        alpha, beta = self.a.process.pid, self.b.process.pid  # type: ignore[union-attr]
        pids = {
            "hop": {"alpha": alpha, "beta": beta},
            "node": {"node": alpha},
            "chain": {"alpha (chain)": alpha, "beta (chain)": beta},
        }.get(arm, {})
        meters = {name: procs.CpuMeter(pid) for name, pid in pids.items()}
        for meter in meters.values():
            meter.start()
        return meters

    def profile(self, seconds: float, connections: int) -> None:
        """py-spy on alpha while it serves one node's requests, then on both nodes while the
        chain and then the hop are asked, sequentially (or by wrk on `connections`):
        bench/profile-hop-live-*.txt; the chain's to subtract from the hop's."""
        alpha, beta = self.a.process.pid, self.b.process.pid  # type: ignore[union-attr]
        self._profile("node", {"alpha-node": alpha}, seconds, connections)
        self._profile("chain", {"beta-chain": beta, "alpha-chain": alpha}, seconds, connections)
        self._profile("hop", {"beta": beta, "alpha": alpha}, seconds, connections)

    def _profile(self, arm: str, pids: dict[str, int], seconds: float, connections: int) -> None:
        from bench.profile import render, summarise

        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        spies = {}
        for name, pid in pids.items():
            out = self.work / f"profile-{name}.txt"
            command = [spy, "record", "-p", str(pid), "-d", str(math.ceil(seconds) + 1)]
            command += ["-r", "250", "-f", "raw", "-o", str(out)]
            spies[name] = (out, subprocess.Popen(command, stdout=subprocess.DEVNULL))
        time.sleep(0.5)
        meters = {name: procs.CpuMeter(pid) for name, pid in pids.items()}
        for meter in meters.values():
            meter.start()
        if connections > 1:
            count = run_wrk(self.targets[arm], connections, seconds, None, self.work).requests
        else:
            with httpx.Client(timeout=30) as client:
                count = len(sequential(client, self.targets[arm], seconds))
        used = {name: meter.stop()[0] for name, meter in meters.items()}
        for name, (out, spy_process) in spies.items():
            spy_process.wait(timeout=120)
            shutil.copy(out, Path(__file__).parent / f"profile-hop-live-{name}.txt")
            summary = summarise(out.read_text(), used[name] / max(count, 1) * 1e6)
            print(f"{name} ({arm} arm, {count} requests): " + render(summary))


def _figures(
    seq: dict[str, list[tuple[float, float]]], cpu: dict[str, list[float]]
) -> dict[str, object]:
    direct = seq["direct"]

    def added(arm: str, q: int) -> list[float]:
        return [r[q] - d[q] for r, d in zip(seq[arm], direct, strict=True)]

    node, hop, chain = added("node", 0), added("hop", 0), added("chain", 0)
    out: dict[str, object] = {
        "direct p50 ms": statistics.median(d[0] for d in direct),
        "node added p50 ms": statistics.median(node),
        "node added p99 ms": statistics.median(added("node", 1)),
        "hop added p50 ms": statistics.median(hop),
        "hop added p99 ms": statistics.median(added("hop", 1)),
        "chain added p50 ms": statistics.median(chain),
        "chain added p99 ms": statistics.median(added("chain", 1)),
        # What the federation itself adds (signature, nonce, receipt), in ms at p50.
        "hop - chain p50 ms": statistics.median([h - c for h, c in zip(hop, chain, strict=True)]),
        # Two plain node passes in a row, over one node's: the hop's floor under this reading.
        "(chain - direct) / (node - direct), p50": _spread(
            [c / max(n, 1e-3) for c, n in zip(chain, node, strict=True)]
        ),
        # The unpinned mode's reading: the hop's whole added latency over one node's.
        "(hop - direct) / (node - direct), p50": _spread(
            [h / max(n, 1e-3) for h, n in zip(hop, node, strict=True)]
        ),
        # What the federation adds over one node pass, over one node's overhead.
        "(hop - node) / (node - direct), p50": _spread(
            [(h - n) / max(n, 1e-3) for h, n in zip(hop, node, strict=True)]
        ),
    }
    for name, values in cpu.items():
        arm = {"node": "one node's", "alpha (chain)": "chain", "beta (chain)": "chain"}
        out[f"{name}: CPU us per {arm.get(name, 'hop')} request"] = _spread(values)
    return out


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}..{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--profile", type=float, default=0, metavar="SECONDS")
    parser.add_argument(
        "--profile-connections", type=int, default=1, help="1: sequential; more: wrk"
    )
    parser.add_argument(
        "--c32", type=float, default=0, metavar="SECONDS", help="and wrk at c=32, rounds of"
    )
    args = parser.parse_args()
    os.chdir(Path(__file__).parent.parent)
    bench = LiveHop(Settings(**asdict(QUICK)), Path(os.devnull), keep=False)
    try:
        bench.setup()
        load = os.getloadavg()[0]
        figures = bench.measure(args.rounds, args.seconds)
        if args.c32:
            figures |= bench.throughput(args.rounds, args.c32)
        code = os.environ.get("PYTHONPATH") or "this checkout"
        print(f"the hop, live, code {code} (load {load:.2f} -> {os.getloadavg()[0]:.2f}):")
        for name, value in figures.items():
            print(f"  {name}: {value:.3f}" if isinstance(value, float) else f"  {name}: {value}")
        if args.profile:
            bench.profile(args.profile, args.profile_connections)
    finally:
        bench.close()


if __name__ == "__main__":
    main()
