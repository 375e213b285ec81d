"""The benchmark's entry point (`python -m bench`, `make bench`): start everything on loopback,
measure every arm in interleaved rounds, print one table, write bench/results.json, stop
everything. See bench/README.md for what each figure means."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import procs
from bench.loadgen import (
    Run,
    StreamClient,
    Target,
    complete_response,
    percentile,
    run_python,
    run_wrk,
    wrk_path,
    wrk_version,
)
from bench.surfaces import SURFACES, Name, body

HERE = Path(__file__).resolve().parent
# The throughput target's rate, and the arms measured again at the busy CPU rate.
TARGET_RPS = 1500
BUSY_ARMS = ("direct", "proxy", "node", "node_responses", "node_messages")
BUSY_ARMS += ("floor_asgi", "floor_litestar")
# The other API surfaces' arms (same node, key, mock and prompt as "node") and the target for
# their figures as a multiple of the chat completions arm's.
SURFACE_ARMS: dict[str, Name] = {"node_responses": "responses", "node_messages": "messages"}
# `--profile-arm node_stream`: alpha serving streamed chats (its own model), profiled.
STREAM_ARM = "node_stream"
SURFACE_TARGET = 1.3
ROOT = HERE.parent
AIHUB = Path(sys.executable).parent / "aihub"
UPSTREAM_KEY_ENV = "BENCH_UPSTREAM_KEY"
# Limits that every request passes through (and none reaches).
RATE_LIMITS = ["--rpm", "1000000000", "--tpm", "1000000000000", "--max-parallel", "100000"]
BUDGET = ["--budget", "1000000"]
ONE = ["--workers", "1"]

LABELS = {
    "direct": "direct to the mock",
    "proxy": "bare proxy (floor)",
    "floor_asgi": "raw ASGI app on uvicorn",
    "floor_litestar": "Litestar app on uvicorn",
    "floor_litestar_forward": "Litestar + node's client (httpx over aiohttp)",
    "floor_litestar_aiohttp": "Litestar + aiohttp client directly",
    "node_echo": "node, echo model (no upstream), plain key",
    "node_plainkey": "node, key without limits",
    "node_ratekey": "node, key with rate limits only",
    "node": "node (virtual key: budget + limits)",
    "node_responses": "node, Responses API",
    "node_messages": "node, Anthropic Messages API",
    "node_granian": "node on granian",
    "node_workers": "node, several workers",
    "hop": "federated hop: beta -> alpha",
}
PACKAGES = ["aihub", "litestar", "uvicorn", "granian", "uvloop", "httptools", "httpx"]
PACKAGES += ["httpx-aiohttp", "aiohttp", "msgspec", "aiosqlite"]
FLOOR_APPS = {
    "floor_asgi": "asgi",
    "floor_litestar": "litestar",
    "floor_litestar_forward": "litestar-forward",
    "floor_litestar_aiohttp": "litestar-aiohttp",
}


@dataclass
class Settings:
    mode: str
    extras: bool  # reference apps, granian, several workers, extra keys
    latency_rounds: int
    latency_seconds: float
    stream_rounds: int
    streams_per_round: int
    throughput_rounds: int
    throughput_seconds: float
    concurrencies: list[int]
    cpu_rounds: int
    cpu_seconds: float
    cpu_rate: float
    cpu_busy_rate: float
    soak_requests: int
    cold_starts: int
    profile_seconds: float
    upstream_latency_ms: float = 0.0
    chunks: int = 8
    chunk_gap_ms: float = 2.0
    loadgen: str = "auto"
    profile_arm: str = "node"
    seed: int = 0


QUICK = Settings(
    mode="quick",
    extras=False,
    latency_rounds=2,
    latency_seconds=1,
    stream_rounds=2,
    streams_per_round=10,
    throughput_rounds=1,
    throughput_seconds=1,
    concurrencies=[1, 8, 32, 64],
    cpu_rounds=1,
    cpu_seconds=1.5,
    cpu_rate=100,
    cpu_busy_rate=1000,
    soak_requests=1_500,
    cold_starts=1,
    profile_seconds=0,
)
FULL = Settings(
    mode="full",
    extras=True,
    latency_rounds=4,
    latency_seconds=3,
    stream_rounds=4,
    streams_per_round=40,
    throughput_rounds=3,
    throughput_seconds=2,
    concurrencies=[1, 8, 32, 64],
    cpu_rounds=3,
    cpu_seconds=4,
    cpu_rate=100,
    cpu_busy_rate=1000,
    soak_requests=50_000,
    cold_starts=3,
    profile_seconds=0,
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def once(target: Target, request: bytes | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    """One request on a fresh connection: (status, whole response)."""
    with socket.create_connection((target.host, target.port), timeout=timeout) as sock:
        sock.sendall(request or target.request())
        buffer = bytearray()
        while complete_response(buffer) is None:
            data = sock.recv(65536)
            if not data:
                break
            buffer += data
    status = complete_response(buffer) or 0
    return status, bytes(buffer)


def plain_target(name: str, port: int, *, stream: bool = False) -> Target:
    request = body("chat", "mock-model", stream=stream)
    return Target(name, "127.0.0.1", port, "/v1/chat/completions", request)


def spread(values: Sequence[float]) -> dict[str, object]:
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return {"value": None, "min": None, "max": None, "rounds": list(values)}
    return {
        "value": statistics.median(clean),
        "min": min(clean),
        "max": max(clean),
        "rounds": [round(v, 4) for v in values],
    }


def pin_self(cpus: set[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)


def system_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / procs.CLOCK_TICKS


def own_seconds() -> float:
    """CPU seconds used by this process, its waited-for children and its live descendants."""
    me = os.getpid()
    fields = Path(f"/proc/{me}/stat").read_text()
    values = fields[fields.rindex(")") + 2 :].split()
    total = sum(int(v) for v in values[11:15]) / procs.CLOCK_TICKS
    return total + procs.cpu_seconds([pid for pid in procs.tree(me) if pid != me])


@dataclass
class Node:
    name: str
    directory: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    def target(
        self,
        name: str,
        key: str,
        model: str = "mock",
        stream: bool = False,
        surface: Name = "chat",
    ) -> Target:
        api = SURFACES[surface]
        request = body(surface, model, stream=stream)
        return Target(name, "127.0.0.1", self.port, api.path, request, api.headers(key))


@dataclass
class Figures:
    values: dict[str, dict[str, object]] = field(default_factory=dict)

    def add(self, name: str, values: Sequence[float] | float, unit: str, label: str) -> None:
        data = spread(values if isinstance(values, Sequence) else [values])
        data.update(unit=unit, label=label)
        self.values[name] = data

    def value(self, name: str) -> float:
        found = self.values.get(name, {}).get("value")
        return math.nan if found is None else float(found)  # type: ignore[arg-type]


class Bench:
    def __init__(self, settings: Settings, output: Path, keep: bool) -> None:
        self.settings = settings
        self.output = output
        self.keep = keep
        self.work = Path(tempfile.mkdtemp(prefix="aihub-bench-"))
        self.all_cpus = set(procs.cores())
        self.node_cpus, self.client_cpus = procs.split_cores()
        self.random = random.Random(settings.seed)
        self.processes: list[subprocess.Popen[bytes]] = []
        self.figures = Figures()
        self.notes: list[str] = []
        self.extra: dict[str, object] = {}
        self.background: dict[str, float] = {}
        self.floors: dict[str, subprocess.Popen[bytes]] = {}
        if settings.loadgen == "wrk" and not wrk_path():
            raise SystemExit("wrk is not installed (apt-get install wrk), or use --loadgen python")
        use_wrk = settings.loadgen == "wrk" or (settings.loadgen == "auto" and wrk_path())
        self.loadgen = "wrk" if use_wrk else "python"
        if not use_wrk:
            self.notes.append(
                "wrk not found: the Python load generator was used (apt-get install wrk)"
            )
        self.started = time.perf_counter()

    # --- plumbing ---------------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f}s] {text}", flush=True)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Note how much CPU something other than the benchmark used meanwhile."""
        busy, own, wall = system_busy_seconds(), own_seconds(), time.perf_counter()
        yield
        foreign = (system_busy_seconds() - busy) - (own_seconds() - own)
        self.background[name] = max(0.0, foreign / (time.perf_counter() - wall))

    def env(self) -> dict[str, str]:
        return {**os.environ, UPSTREAM_KEY_ENV: "sk-bench-upstream", "PYTHONUNBUFFERED": "1"}

    def spawn(self, name: str, command: list[str], cpus: set[int] | None) -> subprocess.Popen:
        process = procs.spawn(command, cpus=cpus, log=self.work / f"{name}.log", env=self.env())
        self.processes.append(process)
        return process

    def cli(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [str(AIHUB), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env(),
        )

    def finish(self, *running: subprocess.Popen[bytes]) -> list[str]:
        outputs = []
        for process in running:
            out, err = process.communicate(timeout=120)
            if process.returncode != 0:
                raise RuntimeError(f"{process.args} failed: {err.decode()[-800:]}")
            outputs.append(out.decode())
        return outputs

    def load(self, target: Target, connections: int, seconds: float) -> Run:
        if self.loadgen == "wrk":
            return run_wrk(target, connections, seconds, self.client_cpus, self.work)
        processes = 1 if connections < 16 else 2
        return run_python(target, connections, seconds, self.client_cpus, processes=processes)

    def wait_answer(self, target: Target, process: subprocess.Popen | None, limit: float) -> float:
        """Seconds until `target` answers 200 (polling every 5 ms)."""
        started = time.perf_counter()
        while time.perf_counter() - started < limit:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{target.name} exited: see its log in {self.work}")
            try:
                status, _ = once(target, timeout=5)
                if status == 200:
                    return time.perf_counter() - started
            except OSError:
                pass
            time.sleep(0.005)
        raise RuntimeError(f"{target.name} did not answer within {limit} s; logs in {self.work}")

    def close(self) -> None:
        for process in reversed(self.processes):
            procs.stop(process)
        if not self.keep:
            shutil.rmtree(self.work, ignore_errors=True)

    def rss(self, process: subprocess.Popen | None) -> float:
        return procs.rss_mb(procs.tree(process.pid)) if process else math.nan

    # --- setup ------------------------------------------------------------------------------

    def setup(self) -> None:
        s = self.settings
        self.say(
            f"mode {s.mode}; cores {sorted(self.all_cpus)}; nodes on {self.node_cpus}, mock "
            f"and load generator on {self.client_cpus}; load generator {self.loadgen}; "
            f"work dir {self.work}"
        )
        self.mock_port, self.proxy_port = free_port(), free_port()
        mock = [sys.executable, "-m", "bench.mock", "--port", str(self.mock_port)]
        mock += ["--latency-ms", str(s.upstream_latency_ms), "--chunks", str(s.chunks)]
        mock += ["--chunk-gap-ms", str(s.chunk_gap_ms)]
        self.mock = self.spawn("mock", mock, self.client_cpus)
        proxy = [sys.executable, "-m", "bench.proxy", "--port", str(self.proxy_port)]
        proxy += ["--upstream", f"127.0.0.1:{self.mock_port}"]
        self.proxy = self.spawn("proxy", proxy, self.node_cpus)
        self.targets: dict[str, Target] = {
            "direct": plain_target("direct", self.mock_port),
            "proxy": plain_target("proxy", self.proxy_port),
        }

        self._make_pair()
        self.say("created alpha and beta (aihub init)")
        requests = [
            ("alpha", "bench", [*BUDGET, *RATE_LIMITS]),
            ("alpha", "plain", []),
            ("beta", "bench", [*BUDGET, *RATE_LIMITS]),
        ]
        if s.extras:
            requests.append(("alpha", "rates", RATE_LIMITS))
        nodes = {"alpha": self.a, "beta": self.b}
        # The invite needs only alpha's data folder: made alongside the keys.
        invite = self.cli("invite", "create", "--cap", "1000000", "--uses", "1", *_dd(self.a))
        *created, token = self.finish(
            *(
                self.cli("keys", "create", "--name", name, *limits, "--json", *_dd(nodes[node]))
                for node, name, limits in requests
            ),
            invite,
        )
        keys = [json.loads(out)["key"] for out in created]
        self.key, self.plain_key, self.b_key = keys[:3]
        self.rate_key = keys[3] if s.extras else None
        self.say("created the virtual keys and an invite (aihub keys create, invite create)")
        # The node's default (one per core unless the config says): the pinned arms run one
        # process on their one core (`--workers 1`), the workers arm the default, on every core.
        self.default_workers = default_workers(self.a.directory)
        self.many_workers = max(2, self.default_workers)
        # Copies of alpha made before it ever runs: same identity and keys, own database.
        self.cold = self._copy(self.a, "alpha-cold")
        starting: list[tuple[Target, subprocess.Popen]] = []
        self.a.process = self._serve(self.a, self.node_cpus, *ONE)
        self.b.process = self._serve(self.b, self.node_cpus, *ONE)
        starting.append((self.a.target("alpha", self.key), self.a.process))
        starting.append((self.b.target("beta", self.b_key, "echo"), self.b.process))
        if s.extras:
            self.granian = self._copy(self.a, "alpha-granian")
            self.workers = self._copy(self.a, "alpha-workers")
            self._serve(self.granian, self.node_cpus, *ONE, "--server", "granian")
            workers = ["--workers", str(self.many_workers)]
            self._serve(self.workers, self.all_cpus, *workers)
            for node in (self.granian, self.workers):
                starting.append((node.target(node.name, self.key), node.process))  # type: ignore[arg-type]
            for name, app in FLOOR_APPS.items():
                port = free_port()
                command = [sys.executable, "-m", "bench.floors", "--app", app, "--port", str(port)]
                command += ["--upstream", f"http://127.0.0.1:{self.mock_port}/v1"]
                process = self.spawn(name, command, self.node_cpus)
                self.floors[name] = process
                self.targets[name] = plain_target(name, port)
                starting.append((self.targets[name], process))
        self.wait_answer(self.targets["direct"], self.mock, 30)
        for target, process in starting:
            self.wait_answer(target, process, 90)
        self.say("every server answers")
        time.sleep(1.0)
        self.rss_idle = self.rss(self.a.process)
        if s.extras:
            self.rss_granian = self.rss(self.granian.process)
            pids = procs.tree(self.workers.process.pid)  # type: ignore[union-attr]
            self.pss_workers = procs.pss_mb(pids)

        # Federation: beta joins alpha with an invite, through the CLI, as a user would.
        self.finish(self.cli("join", token.strip(), *_dd(self.b)))
        self.wait_answer(self.b.target("hop", self.b_key), self.b.process, 30)
        self.say("beta joined alpha (aihub invite create / aihub join) and routes to it")

        self.targets.update(
            {
                "node": self.a.target("node", self.key),
                "node_plainkey": self.a.target("node_plainkey", self.plain_key),
                "hop": self.b.target("hop", self.b_key),
            }
        )
        for arm, surface in SURFACE_ARMS.items():
            self.targets[arm] = self.a.target(arm, self.key, surface=surface)
        if s.profile_arm == STREAM_ARM:  # profiled only: every other phase times streams itself
            self.targets[STREAM_ARM] = self.a.target(STREAM_ARM, self.key, stream=True)
        if s.extras:
            self.targets.update(
                {
                    "node_echo": self.a.target("node_echo", self.plain_key, "echo"),
                    "node_ratekey": self.a.target("node_ratekey", self.rate_key or ""),
                    "node_granian": self.granian.target("node_granian", self.key),
                    "node_workers": self.workers.target("node_workers", self.key),
                }
            )
        for name, target in self.targets.items():
            status, answer = once(target)
            marker = SURFACES[SURFACE_ARMS.get(name, "chat")].marker
            if status != 200 or marker not in answer:
                raise RuntimeError(f"{name} answered {status}: {answer[-300:]!r}")

    def _make_pair(self) -> None:
        """alpha (the mock as its model `mock`) and beta (no model of its own: it reaches
        alpha's as a peer once it joins), made with `aihub init` and configured, not served."""
        self.a = Node("alpha", self.work / "alpha", free_port())
        self.b = Node("beta", self.work / "beta", free_port())
        self.finish(
            *(
                self.cli("init", "--name", n.name, "--data-dir", str(n.directory))
                for n in (self.a, self.b)
            )
        )
        self._configure(self.a, with_mock=True)
        self._configure(self.b, with_mock=False)

    def _configure(self, node: Node, *, with_mock: bool) -> None:
        path = node.directory / "config.toml"
        text = path.read_text().replace("port = 8787", f"port = {node.port}", 1)
        if with_mock:
            text += (
                "\n[[models]]\n"
                'name = "mock"\n'
                'provider = "openai"\n'
                'model = "mock-model"\n'
                f'base_url = "http://127.0.0.1:{self.mock_port}/v1"\n'
                f'api_key_env = "{UPSTREAM_KEY_ENV}"\n'
                "price_in = 150_000\n"
                "price_out = 600_000\n"
            )
        path.write_text(text)

    def _copy(self, node: Node, name: str) -> Node:
        copy = Node(name, self.work / name, free_port())
        shutil.copytree(node.directory, copy.directory)
        path = copy.directory / "config.toml"
        path.write_text(path.read_text().replace(f"port = {node.port}", f"port = {copy.port}", 1))
        return copy

    def _serve(self, node: Node, cpus: set[int] | None, *extra: str) -> subprocess.Popen:
        command = [str(AIHUB), "serve", *_dd(node), "--port", str(node.port), *extra]
        node.process = self.spawn(node.name, command, cpus)
        return node.process

    def present(self, arms: Sequence[str]) -> list[str]:
        return [arm for arm in arms if arm in self.targets]

    # --- phases -----------------------------------------------------------------------------

    def rounds(self, count: int, items: Sequence[object]) -> Iterator[list[object]]:
        for _ in range(count):
            order = list(items)
            self.random.shuffle(order)
            yield order

    def latency(self) -> None:
        """Sequential requests (concurrency 1) through each arm, in shuffled order each round;
        each added latency is taken against the direct run of the same round."""
        s = self.settings
        arms = ["direct", "proxy", *FLOOR_APPS, "node", *SURFACE_ARMS, "node_plainkey"]
        arms.append("node_granian")
        arms = self.present([*arms, "node_workers", "hop"])
        self.say(f"latency: {len(arms)} arms x {s.latency_rounds} rounds x {s.latency_seconds} s")
        self.seq: dict[str, list[Run]] = {arm: [] for arm in arms}
        for order in self.rounds(s.latency_rounds, arms):
            for arm in order:
                self.seq[str(arm)].append(self.load(self.targets[str(arm)], 1, s.latency_seconds))
        f = self.figures
        direct = self.seq["direct"]
        f.add("direct_p50_ms", [r.p50_ms for r in direct], "ms", "direct to the mock: p50")
        f.add("direct_p99_ms", [r.p99_ms for r in direct], "ms", "direct to the mock: p99")
        for arm in arms:
            if arm in ("direct", "hop"):
                continue
            for q in ("p50", "p99"):
                added = [
                    getattr(r, f"{q}_ms") - getattr(d, f"{q}_ms")
                    for r, d in zip(self.seq[arm], direct, strict=True)
                ]
                f.add(f"{arm}_added_{q}_ms", added, "ms", f"{LABELS[arm]}: added {q}")
        for q in ("p50", "p99"):
            hop = [
                getattr(h, f"{q}_ms") - getattr(n, f"{q}_ms")
                for h, n in zip(self.seq["hop"], self.seq["node"], strict=True)
            ]
            f.add(f"hop_added_{q}_ms", hop, "ms", f"federated hop: added {q} (B->A vs A)")
        ratio = [
            (h.p50_ms - n.p50_ms) / max(n.p50_ms - d.p50_ms, 1e-6)
            for h, n, d in zip(self.seq["hop"], self.seq["node"], direct, strict=True)
        ]
        f.add("hop_over_node_p50", ratio, "x", "hop's added p50 / node's added p50")
        ratio = [
            (n.p50_ms - d.p50_ms) / max(p.p50_ms - d.p50_ms, 1e-6)
            for n, p, d in zip(self.seq["node"], self.seq["proxy"], direct, strict=True)
        ]
        f.add("node_over_proxy_p50", ratio, "x", "node's added p50 / bare proxy's added p50")
        for arm in SURFACE_ARMS:
            for q in ("p50", "p99"):
                ratio = [
                    (getattr(r, f"{q}_ms") - getattr(d, f"{q}_ms"))
                    / max(getattr(n, f"{q}_ms") - getattr(d, f"{q}_ms"), 1e-6)
                    for r, n, d in zip(self.seq[arm], self.seq["node"], direct, strict=True)
                ]
                label = f"{LABELS[arm]}: added {q} / chat completions' added {q}"
                f.add(f"{arm}_over_chat_{q}", ratio, "x", label)
        errors = sum(r.errors for runs in self.seq.values() for r in runs)
        f.add("latency_errors", float(errors), "", "errors in the latency runs")

    def streaming(self) -> None:
        """Streamed chats, one at a time, timing every event: first event and gaps."""
        s = self.settings
        targets = {
            "direct": plain_target("direct", self.mock_port, stream=True),
            "proxy": plain_target("proxy", self.proxy_port, stream=True),
            "node": self.a.target("node", self.key, stream=True),
            "hop": self.b.target("hop", self.b_key, stream=True),
        }
        for arm, surface in SURFACE_ARMS.items():
            targets[arm] = self.a.target(arm, self.key, stream=True, surface=surface)
        expected = {
            arm: s.chunks + SURFACES[SURFACE_ARMS.get(arm, "chat")].stream_events for arm in targets
        }
        self.say(
            f"streaming: {len(targets)} arms x {s.stream_rounds} rounds x {s.streams_per_round} "
            f"streams of {s.chunks} deltas, {s.chunk_gap_ms:g} ms apart"
        )
        per_round: dict[str, list[tuple[float, float, int, int]]] = {arm: [] for arm in targets}
        for order in self.rounds(s.stream_rounds, list(targets)):
            for arm in order:
                target = targets[str(arm)]
                client = StreamClient(target.host, target.port)
                request = target.request()
                client.stream(request)  # warm the connection and the path
                firsts, gaps, lost, failed = [], [], 0, 0
                for _ in range(s.streams_per_round):
                    timing = client.stream(request)
                    if timing.status != 200:
                        failed += 1
                        continue
                    firsts.append(timing.first_event_ms)
                    gaps.extend(timing.gaps_ms)
                    lost += max(0, expected[str(arm)] - timing.events)
                client.close()
                firsts.sort()
                gaps.sort()
                per_round[str(arm)].append(
                    (percentile(firsts, 0.5), percentile(gaps, 0.99), lost, failed)
                )
        f = self.figures
        direct = per_round["direct"]
        f.add("direct_ttfb_ms", [d[0] for d in direct], "ms", "stream direct: first event p50")
        f.add("direct_gap_p99_ms", [d[1] for d in direct], "ms", "stream direct: gap p99")
        for arm in ("proxy", "node", *SURFACE_ARMS, "hop"):
            runs = per_round[arm]
            label = LABELS[arm] if arm in SURFACE_ARMS else arm
            f.add(
                f"{arm}_stream_added_ttfb_ms",
                [r[0] - d[0] for r, d in zip(runs, direct, strict=True)],
                "ms",
                f"stream {label}: added time to first event (p50)",
            )
            f.add(
                f"{arm}_stream_added_gap_p99_ms",
                [r[1] - d[1] for r, d in zip(runs, direct, strict=True)],
                "ms",
                f"stream {label}: added gap between events (p99)",
            )
            lost = float(sum(r[2] for r in runs) + sum(r[3] for r in runs) * expected[arm])
            f.add(f"{arm}_stream_events_lost", lost, "", f"stream {label}: events lost")
        node = per_round["node"]
        for arm in SURFACE_ARMS:
            ratio = [
                (r[0] - d[0]) / max(n[0] - d[0], 1e-6)
                for r, n, d in zip(per_round[arm], node, direct, strict=True)
            ]
            label = f"stream {LABELS[arm]}: added time to first event / chat completions'"
            f.add(f"{arm}_stream_over_chat_ttfb", ratio, "x", label)

    def throughput(self) -> None:
        """Closed-loop load at each concurrency, arms and concurrencies shuffled per round;
        concurrency 1 comes from the latency rounds."""
        s = self.settings
        arms = self.present(
            ["direct", "proxy", "floor_litestar_forward", "node", "node_granian", "node_workers"]
        )
        levels = [c for c in s.concurrencies if c > 1]
        combos = [(arm, c) for arm in arms for c in levels]
        self.say(
            f"throughput: {len(arms)} arms x concurrency {levels} x {s.throughput_rounds} rounds "
            f"x {s.throughput_seconds} s"
        )
        runs: dict[tuple[str, int], list[Run]] = {combo: [] for combo in combos}
        for order in self.rounds(s.throughput_rounds, combos):
            for arm, c in order:  # type: ignore[misc]
                runs[(arm, c)].append(self.load(self.targets[arm], c, s.throughput_seconds))
        if 1 in s.concurrencies:
            for arm in arms:
                runs[(arm, 1)] = self.seq[arm]
        f = self.figures
        for arm in arms:
            for c in s.concurrencies:
                f.add(
                    f"{arm}_c{c}_rps",
                    [r.rps for r in runs[(arm, c)]],
                    "req/s",
                    f"throughput {LABELS[arm]}, concurrency {c}",
                )
            f.add(
                f"{arm}_throughput_errors",
                float(sum(r.errors for c in s.concurrencies for r in runs[(arm, c)])),
                "",
                f"throughput {LABELS[arm]}: errors",
            )
        self.fixed_rate_c32()
        if 32 in s.concurrencies:
            direct = runs[("direct", 32)]
            for arm in arms:
                if arm == "direct":
                    continue
                f.add(
                    f"{arm}_c32_added_p99_ms",
                    [r.p99_ms - d.p99_ms for r, d in zip(runs[(arm, 32)], direct, strict=True)],
                    "ms",
                    f"{LABELS[arm]}, concurrency 32: added p99",
                )

    def _cpu_runs(
        self, meters: dict[str, list[int]], rate: float
    ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        """Each arm's CPU µs per request at `rate` (and the hop's by node), over the rounds."""
        s = self.settings
        self.say(
            f"cpu: {len(meters)} arms x {s.cpu_rounds} rounds x {s.cpu_seconds} s at "
            f"{rate:g} requests/s"
        )
        results: dict[str, list[float]] = {arm: [] for arm in meters}
        parts: dict[str, list[float]] = {"beta": [], "alpha": []}
        for order in self.rounds(s.cpu_rounds, list(meters)):
            for arm in order:
                cpu_meters = [procs.CpuMeter(pid) for pid in meters[str(arm)]]
                for meter in cpu_meters:
                    meter.start()
                run = run_python(
                    self.targets[str(arm)], 4, s.cpu_seconds, self.client_cpus, rate=rate
                )
                used = [meter.stop()[0] for meter in cpu_meters]
                served = max(run.requests, 1)
                results[str(arm)].append(sum(used) / served * 1e6)
                if arm == "hop":
                    parts["beta"].append(used[0] / served * 1e6)
                    parts["alpha"].append(used[1] / served * 1e6)
        return results, parts

    def fixed_rate_c32(self) -> None:
        """The target's "1,500 requests/s at concurrency 32 with p99 added <= 10 ms": 32
        connections sending 1,500 requests/s on a fixed schedule (open loop). A closed loop
        at 32 saturates the node, so its latency is 32 / throughput by construction."""
        s = self.settings
        arms = self.present(["direct", "node"])
        self.say(f"fixed rate: {arms} at {TARGET_RPS} req/s over 32 connections")
        runs: dict[str, list[Run]] = {arm: [] for arm in arms}
        for order in self.rounds(s.throughput_rounds, arms):
            for arm in order:
                runs[str(arm)].append(
                    run_python(
                        self.targets[str(arm)],
                        32,
                        s.throughput_seconds,
                        self.client_cpus,
                        rate=TARGET_RPS,
                    )
                )
        f = self.figures
        f.add(
            "node_rate32_rps",
            [r.rps for r in runs["node"]],
            "req/s",
            f"node at {TARGET_RPS:,} req/s x 32: served",
        )
        f.add(
            "node_rate32_added_p99_ms",
            [r.p99_ms - d.p99_ms for r, d in zip(runs["node"], runs["direct"], strict=True)],
            "ms",
            f"node at {TARGET_RPS:,} req/s x 32 connections: added p99",
        )
        f.add(
            "node_rate32_errors",
            float(sum(r.errors for r in runs["node"])),
            "",
            f"node at {TARGET_RPS:,} req/s x 32: errors",
        )

    def cpu(self) -> None:
        """CPU time per request of each arm's processes, at a fixed request rate (and some arms
        at a busier one)."""
        s = self.settings
        alpha = self.a.process.pid  # type: ignore[union-attr]
        meters: dict[str, list[int]] = {
            "direct": [self.mock.pid],
            "proxy": [self.proxy.pid],
            "node": [alpha],
            **{arm: [alpha] for arm in SURFACE_ARMS},
            "node_plainkey": [alpha],
            "hop": [self.b.process.pid, alpha],  # type: ignore[union-attr]
        }
        if s.extras:
            meters.update(
                {
                    "node_echo": [alpha],
                    "node_ratekey": [alpha],
                    "node_granian": [self.granian.process.pid],  # type: ignore[union-attr]
                }
            )
            meters.update({name: [process.pid] for name, process in self.floors.items()})
        results, parts = self._cpu_runs(meters, s.cpu_rate)
        # At 100 req/s the node sleeps between requests and each one runs from cold caches
        # (the raw ASGI floor costs several times more per request than when busy): the same
        # arms again at a rate that keeps the core busy, still well below capacity.
        busy = {arm: meters[arm] for arm in meters if arm in BUSY_ARMS}
        busy_results, _ = self._cpu_runs(busy, s.cpu_busy_rate)
        f = self.figures
        for arm, values in busy_results.items():
            label = "the mock itself" if arm == "direct" else LABELS[arm]
            f.add(
                f"{arm}_cpu_busy_us",
                values,
                "us/req",
                f"CPU per request at {s.cpu_busy_rate:g} req/s: {label}",
            )
        for arm, values in results.items():
            label = "the mock itself" if arm == "direct" else LABELS[arm]
            f.add(f"{arm}_cpu_us", values, "us/req", f"CPU per request: {label}")
        f.add("hop_beta_cpu_us", parts["beta"], "us/req", "CPU per request: hop, beta's part")
        f.add("hop_alpha_cpu_us", parts["alpha"], "us/req", "CPU per request: hop, alpha's part")
        if s.extras:
            layers = [
                ("layer_server_us", "floor_asgi", None, "layer: ASGI server (uvicorn)"),
                ("layer_framework_us", "floor_litestar", "floor_asgi", "layer: Litestar"),
                (
                    "layer_client_us",
                    "floor_litestar_forward",
                    "floor_litestar",
                    "layer: HTTP client (httpx over aiohttp)",
                ),
                (
                    "layer_httpx_us",
                    "floor_litestar_forward",
                    "floor_litestar_aiohttp",
                    "layer: of which httpx's own layer",
                ),
                (
                    "layer_node_logic_us",
                    "node_plainkey",
                    "floor_litestar_forward",
                    "layer: node's logic (key without limits)",
                ),
                ("layer_rate_limits_us", "node_ratekey", "node_plainkey", "layer: rate limits"),
                ("layer_budget_us", "node", "node_ratekey", "layer: budget reservation"),
            ]
            for name, arm, base, label in layers:
                values = [a - (results[base][i] if base else 0) for i, a in enumerate(results[arm])]
                f.add(name, values, "us/req", label)

    def soak(self) -> None:
        """Memory of alpha over `soak_requests` more requests, at concurrency 32."""
        s = self.settings
        self.say(f"memory: {s.soak_requests:,} requests through alpha at concurrency 32")
        served, curve = 0, [(0, self.rss(self.a.process))]
        rate = self.figures.value("node_c32_rps")
        rate = rate if rate and not math.isnan(rate) else 200.0
        step = max(1.0, round(s.soak_requests / 10 / rate))
        errors = 0
        while served < s.soak_requests:
            run = self.load(self.targets["node"], 32, step)
            served += run.requests
            errors += run.errors
            curve.append((served, self.rss(self.a.process)))
        time.sleep(0.5)
        curve.append((served, self.rss(self.a.process)))
        tenth = next((rss for count, rss in curve if count >= s.soak_requests / 10), curve[0][1])
        f = self.figures
        f.add("rss_idle_mb", self.rss_idle, "MB", "RSS of alpha after start")
        f.add(
            "rss_after_soak_mb", curve[-1][1], "MB", f"RSS of alpha after {served:,} more requests"
        )
        f.add(
            "rss_growth_mb", curve[-1][1] - tenth, "MB", "RSS growth after the soak's first tenth"
        )
        f.add("soak_errors", float(errors), "", "errors in the soak")
        if s.extras:
            f.add("rss_granian_idle_mb", self.rss_granian, "MB", "RSS of the node on granian")
            label = f"PSS of the node with {self.many_workers} workers (all processes)"
            f.add("pss_workers_idle_mb", self.pss_workers, "MB", label)
        self.extra["rss_curve"] = [{"requests": n, "rss_mb": round(r, 1)} for n, r in curve]

    def cold_start(self) -> None:
        """From spawning `aihub serve` to its first answered chat request, each time anew."""
        s = self.settings
        self.say(f"cold start: {s.cold_starts} times")
        times, rss = [], []
        target = self.cold.target("cold", self.key)
        for _ in range(s.cold_starts):
            started = time.perf_counter()
            process = self._serve(self.cold, self.node_cpus, *ONE)
            self.wait_answer(target, process, 60)
            times.append(time.perf_counter() - started)
            rss.append(self.rss(process))
            procs.stop(process)
            self.processes.remove(process)
        self.figures.add("cold_start_s", times, "s", "cold start to the first answered request")

    def profile(self) -> None:
        """py-spy at the fixed CPU rate: where each node's time per request goes, for alpha
        serving its own model or (`--profile-arm hop`) for beta and alpha in the hop."""
        s = self.settings
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            self.notes.append("profile skipped: py-spy is not installed (pip install py-spy)")
            return
        nodes = {"alpha": self.a.process.pid}  # type: ignore[union-attr]
        if s.profile_arm == "hop":
            nodes = {"beta": self.b.process.pid, **nodes}  # type: ignore[union-attr]
        self.say(
            f"profile: py-spy on {', '.join(nodes)} for {s.profile_seconds:g} s at "
            f"{s.cpu_rate:g} req/s through the {s.profile_arm} arm"
        )
        spies = {}
        for name, pid in nodes.items():
            out = self.work / f"profile-{name}.txt"
            command = [spy, "record", "-p", str(pid), "-d", str(math.ceil(s.profile_seconds) + 1)]
            command += ["-r", "250", "-f", "raw", "-o", str(out)]
            spies[name] = (
                out,
                subprocess.Popen(
                    command,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    preexec_fn=lambda: pin_self(self.client_cpus),
                ),
            )
        time.sleep(0.5)
        meters = {name: procs.CpuMeter(pid) for name, pid in nodes.items()}
        for meter in meters.values():
            meter.start()
        run = run_python(
            self.targets[s.profile_arm], 4, s.profile_seconds, self.client_cpus, rate=s.cpu_rate
        )
        used = {name: meter.stop()[0] for name, meter in meters.items()}
        from bench.profile import render, summarise

        texts = []
        for name, (out, spy_process) in spies.items():
            spy_process.wait(timeout=120)
            if not out.exists():
                self.notes.append("profile failed: py-spy wrote nothing (ptrace permission?)")
                return
            shutil.copy(out, HERE / f"profile-{s.profile_arm}-{name}.txt")
            summary = summarise(out.read_text(), used[name] / max(run.requests, 1) * 1e6)
            self.extra[f"profile_{name}"] = summary
            texts.append(f"{name}: " + render(summary))
        self.extra["profile_text"] = "\n".join(texts)

    # --- report -----------------------------------------------------------------------------

    def verdicts(self) -> list[dict[str, object]]:
        v = self.figures.value
        checks = [
            ("node_added_p50_ms", "<=", 0.7, "added latency p50, concurrency 1"),
            ("node_added_p99_ms", "<=", 2.0, "added latency p99, concurrency 1"),
            ("node_stream_added_ttfb_ms", "<=", 1.0, "stream: added time to first event"),
            ("node_stream_added_gap_p99_ms", "<=", 0.5, "stream: added gap p99"),
            ("node_stream_events_lost", "<=", 0, "stream: no event lost"),
            ("node_c32_rps", ">=", 1500, "one node process, concurrency 32"),
            ("node_rate32_added_p99_ms", "<=", 10.0, "1,500 req/s over 32 connections: added p99"),
            ("node_throughput_errors", "<=", 0, "no error under load"),
            ("node_cpu_us", "<=", 400, "CPU per request at 100 req/s"),
            # The speed issue's target for a request, pinned, at 1,000 req/s.
            ("node_cpu_busy_us", "<=", 200, "CPU per request at 1,000 req/s"),
            ("hop_over_node_p50", "<=", 2.0, "hop adds <= 2x the node's overhead"),
            *(
                (f"{arm}_{figure}", "<=", target, f"{LABELS[arm]}: {what}")
                for arm in SURFACE_ARMS
                for figure, target, what in (
                    ("over_chat_p50", SURFACE_TARGET, "added p50 / chat's"),
                    ("over_chat_p99", SURFACE_TARGET, "added p99 / chat's"),
                    ("stream_over_chat_ttfb", SURFACE_TARGET, "added first event / chat's"),
                    ("stream_events_lost", 0, "stream: no event lost"),
                )
            ),
            ("rss_idle_mb", "<=", 100, "RSS idle"),
            ("rss_after_soak_mb", "<=", 150, "RSS steady"),
            ("rss_growth_mb", "<=", 5, "no growth (noise: 5 MB)"),
            ("cold_start_s", "<=", 2.0, "cold start"),
        ]
        out = []
        for name, op, target, what in checks:
            measured = v(name)
            if math.isnan(measured):
                continue
            met = measured <= target if op == "<=" else measured >= target
            if met:
                note = "met"
            elif op == ">=":
                note = f"MISSED: {measured / target:.0%} of target"
            elif target:
                note = f"MISSED: {measured / target:.1f}x target"
            else:
                note = f"MISSED by {measured:g}"
            out.append(
                {"figure": name, "target": f"{op} {target:g}", "what": what, "met": met}
                | {"measured": round(measured, 4), "note": note}
            )
        return out

    def table(self, verdicts: list[dict[str, object]]) -> str:
        by_name = {str(item["figure"]): item for item in verdicts}
        rows = [("figure", "median", "min..max", "unit", "target", "verdict")]
        for name, data in self.figures.values.items():
            value, low, high = data["value"], data["min"], data["max"]
            verdict = by_name.get(name, {})
            rows.append(
                (
                    str(data["label"]),
                    _fmt(value),
                    "" if low == high else f"{_fmt(low)}..{_fmt(high)}",
                    str(data["unit"]),
                    str(verdict.get("target", "")),
                    str(verdict.get("note", "")),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = []
        for index, row in enumerate(rows):
            cells = [
                cell.rjust(widths[i]) if i in (1, 2) else cell.ljust(widths[i])
                for i, cell in enumerate(row)
            ]
            lines.append("| " + " | ".join(cells) + " |")
            if index == 0:
                lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines)

    def write(self, command: str) -> None:
        background = max(self.background.values(), default=0.0)
        self.figures.add(
            "background_cpu_cores",
            [self.background[name] for name in self.background],
            "cores",
            "CPU used by other programs meanwhile (per phase)",
        )
        if background > 0.15:
            self.notes.append(
                f"other programs used up to {background:.2f} cores during a phase: latency and "
                "throughput are disturbed; CPU per request much less so"
            )
        profile = self.extra.get("profile_text")
        fields = {
            "machine": {
                "cores": os.cpu_count(),
                "cores_available": len(self.all_cpus),
                "node_cores": sorted(self.node_cpus or []),
                "client_cores": sorted(self.client_cpus or []),
                "kernel": platform.release(),
                "cpu": _cpu_model(),
            },
            "load_generator": self.loadgen,
            "settings": asdict(self.settings),
            "workers": {"default": self.default_workers, "several": self.many_workers},
        }
        self.publish(command, fields, [str(profile)] if profile else [])

    def versions(self) -> dict[str, str | None]:
        versions = {name: _version(name) for name in PACKAGES}
        versions["python"] = platform.python_version()
        versions["wrk"] = wrk_version()
        return versions

    def publish(self, command: str, fields: dict[str, object], texts: Sequence[str]) -> None:
        """Print the table (then `texts`, then the notes) and write the results file: what
        every mode's file holds, and the mode's own `fields`."""
        verdicts = self.verdicts()
        table = self.table(verdicts)
        print()
        print(table)
        print()
        for text in texts:
            print(text)
            print()
        for note in self.notes:
            print("note:", note)
        result = {
            "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": command,
            **fields,
            "versions": self.versions(),
            "background_cpu_cores": {k: round(v, 3) for k, v in self.background.items()},
            "figures": self.figures.values,
            "targets": verdicts,
            "notes": self.notes,
            "table": table,
            "seconds": round(time.perf_counter() - self.started, 1),
            **self.extra,
        }
        self.output.write_text(json.dumps(result, indent=2) + "\n")
        self.say(f"wrote {self.output}")


def default_workers(directory: Path) -> int:
    """How many workers `aihub serve` starts for the node in `directory` (its config's
    `workers`, else one per core)."""
    from node.config import load_config

    return load_config(directory).server.worker_count()


def _dd(node: Node) -> list[str]:
    return ["--data-dir", str(node.directory)]


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    number = float(value)  # type: ignore[arg-type]
    if abs(number) >= 100:
        return f"{number:,.0f}"
    if abs(number) >= 10:
        return f"{number:.1f}"
    return f"{number:.3f}" if number != int(number) else f"{int(number)}"


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def parse(argv: Sequence[str] | None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="aihub's gateway benchmark (see bench/README.md)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run in under a minute")
    parser.add_argument("--requests", type=int, help="requests in the memory soak")
    parser.add_argument("--rounds", type=int, help="rounds for every phase")
    parser.add_argument("--seconds", type=float, help="seconds per latency/throughput run")
    parser.add_argument("--upstream-latency-ms", type=float, help="the mock's delay")
    parser.add_argument("--chunk-gap-ms", type=float, help="the mock's gap between events")
    parser.add_argument("--cpu-rate", type=float, help="requests/s for the CPU runs")
    parser.add_argument("--cpu-seconds", type=float, help="seconds per CPU run")
    parser.add_argument("--cold-starts", type=int)
    parser.add_argument(
        "--extras",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="reference apps, granian, several workers, extra keys [full: on, quick: off]",
    )
    parser.add_argument("--profile", type=float, default=0, metavar="SECONDS", help="py-spy")
    parser.add_argument(
        "--profile-arm",
        choices=["node", STREAM_ARM, "hop", *SURFACE_ARMS],
        default="node",
        help="what --profile drives",
    )
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--only", help=f"comma-separated phases of: {', '.join(PHASES)}")
    parser.add_argument(
        "--unpinned",
        action="store_true",
        help="the unpinned mode (bench/unpinned.py): nothing pinned, nginx as the floor",
    )
    parser.add_argument(
        "--output", type=Path, help="[default: bench/results.json, unpinned: results-unpinned.json]"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir and its logs")
    args = parser.parse_args(argv)
    settings = Settings(**asdict(QUICK if args.quick else FULL))
    overrides = {
        "soak_requests": args.requests,
        "upstream_latency_ms": args.upstream_latency_ms,
        "chunk_gap_ms": args.chunk_gap_ms,
        "cpu_rate": args.cpu_rate,
        "cpu_seconds": args.cpu_seconds,
        "cold_starts": args.cold_starts,
        "extras": args.extras,
    }
    if args.rounds is not None:
        overrides |= dict.fromkeys(
            ("latency_rounds", "stream_rounds", "throughput_rounds", "cpu_rounds"), args.rounds
        )
    if args.seconds is not None:
        overrides |= dict.fromkeys(("latency_seconds", "throughput_seconds"), args.seconds)
    for name, value in overrides.items():
        if value is not None:
            setattr(settings, name, value)
    settings.profile_seconds = args.profile
    settings.profile_arm = args.profile_arm
    settings.loadgen = args.loadgen
    settings.seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    return settings, args


PHASES = ("latency", "streaming", "throughput", "cpu", "soak", "cold_start", "profile")


def main(argv: Sequence[str] | None = None) -> None:
    settings, args = parse(argv)
    command = " ".join(["python -m bench", *(argv or sys.argv[1:])])
    if args.unpinned:
        from bench.unpinned import run

        run(settings, args.output or HERE / "results-unpinned.json", args.keep, command)
        return
    os.chdir(ROOT)
    bench = Bench(settings, args.output or HERE / "results.json", args.keep)
    only = set(args.only.split(",")) if args.only else set(PHASES)
    if only & {"throughput", "soak"}:
        only.add("latency")  # concurrency 1 (and the soak's pace) come from there
    # The orchestrator (and the streaming client it runs) shares the load generator's core.
    pin_self(bench.client_cpus)
    try:
        bench.setup()
        steps: list[tuple[str, Callable[[], None]]] = [
            ("latency", bench.latency),
            ("streaming", bench.streaming),
            ("throughput", bench.throughput),
            ("cpu", bench.cpu),
            ("soak", bench.soak),
            ("cold_start", bench.cold_start),
            ("profile", bench.profile),
        ]
        for name, step in steps:
            if name in only and (name != "profile" or settings.profile_seconds > 0):
                with bench.phase(name):
                    step()
        bench.write(command)
    finally:
        bench.close()


if __name__ == "__main__":
    main()
