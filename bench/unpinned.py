"""The unpinned mode (`python -m bench --unpinned`, the second half of `make bench`): the node
measured the way a user's server runs it. Nothing is pinned: the node, its upstream, the load
generator and the client share every core. The upstream is a mock written with aiohttp
(bench/mock_aiohttp.py), latency comes from a Python httpx client over keep-alive, throughput
from wrk at concurrency 32, every request through a node carries a virtual key with a budget
and limits, and the floor is nginx as a reverse proxy (a generated nginx.conf in the work
folder, loopback only). Every figure is a ratio to the floor measured in the same run, in
shuffled interleaved rounds. See bench/README.md, "Unpinned mode"."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.cores import Meter, Split, place
from bench.loadgen import Run, Target, percentile, run_wrk, wrk_path
from bench.nginx import nginx_main, nginx_path
from bench.run import (
    BUDGET,
    HERE,
    RATE_LIMITS,
    Bench,
    Node,
    Settings,
    _dd,
    default_workers,
    free_port,
    plain_target,
)

LABELS = {
    "direct": "direct to the aiohttp mock",
    "nginx": "nginx reverse proxy (the floor)",
    "node": "aihub, one process",
    "node_workers": "aihub, default workers",
    "node_granian": "aihub on granian, one process",
    "hop": "aihub hop (client -> B -> A -> mock)",
}
ARMS = tuple(LABELS)
CONCURRENCY = 32
# The long-running processes each arm's requests pass through (wrk is measured apart).
ARM_GROUPS = {
    "direct": ("mock",),
    "nginx": ("nginx", "mock"),
    "node": ("alpha", "mock"),
    "node_workers": ("alpha-workers", "mock"),
    "node_granian": ("alpha-granian", "mock"),
    "hop": ("beta", "alpha", "mock"),
}

# The floor: nginx as a plain reverse proxy to the mock, loopback only.
_FLOOR = """\
    upstream mock {{
        server 127.0.0.1:{upstream};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
"""


def nginx_conf(root: Path, port: int, upstream: int) -> Path:
    return nginx_main(root, _FLOOR.format(port=port, upstream=upstream))


def _timed(client: httpx.Client, target: Target) -> float:
    """One request's milliseconds. A failed request is an error, not a latency."""
    started = time.perf_counter()
    response = client.post(target.url, content=target.body, headers=target.headers)
    elapsed = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise RuntimeError(f"{target.name} answered {response.status_code}: {response.text}")
    return elapsed


def sequential(client: httpx.Client, target: Target, seconds: float) -> list[float]:
    """Requests one after another on one keep-alive connection for `seconds`: each one's
    milliseconds, sorted."""
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        times.append(_timed(client, target))
    return sorted(times)


def after_idle(client: httpx.Client, target: Target, count: int, idle: float) -> list[float]:
    """`count` complete answers, each asked after `idle` seconds with nothing to do: what a
    stream's first byte is measured after (a stream's events come `--chunk-gap-ms` apart, the
    node idles in between, and the next stream starts on cold caches), where back-to-back
    requests (`sequential`) keep every process hot. Milliseconds, sorted."""
    times: list[float] = []
    for _ in range(count):
        time.sleep(idle)
        times.append(_timed(client, target))
    return sorted(times)


def first_bytes(client: httpx.Client, target: Target, count: int) -> list[float]:
    """`count` streamed requests one after another: milliseconds to the body's first bytes
    (the first event, as an SDK sees it), each stream then read to its end. Sorted."""
    times: list[float] = []
    for _ in range(count):
        started = time.perf_counter()
        with client.stream("POST", target.url, content=target.body, headers=target.headers) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{target.name} stream answered {r.status_code}")
            chunks = r.iter_raw()
            next(chunks)
            times.append((time.perf_counter() - started) * 1000)
            received = sum(1 for _ in chunks)
        del received
    return sorted(times)


class Unpinned(Bench):
    """The arms of LABELS, everything unpinned; Bench's plumbing (processes, CLI, figures)."""

    def __init__(self, settings: Settings, output: Path, keep: bool) -> None:
        super().__init__(settings, output, keep)
        self.node_cpus = self.client_cpus = None
        if not wrk_path() or not nginx_path():
            raise SystemExit(
                "the unpinned mode needs wrk and nginx (apt-get install wrk nginx-light; "
                "`make bench` installs them)"
            )
        self.loadgen = "wrk"

    def setup(self) -> None:
        s = self.settings
        self.say(f"unpinned mode; cores {sorted(self.all_cpus)}, shared by all; work {self.work}")
        self.mock_port, nginx_port = free_port(), free_port()
        mock = [sys.executable, "-m", "bench.mock_aiohttp", "--port", str(self.mock_port)]
        mock += ["--chunks", str(s.chunks), "--chunk-gap-ms", str(s.chunk_gap_ms)]
        self.mock = self.spawn("mock", mock, None)
        conf = nginx_conf(self.work / "nginx", nginx_port, self.mock_port)
        nginx = self.spawn(
            "nginx", [nginx_path() or "nginx", "-p", str(conf.parent), "-c", str(conf)], None
        )
        self._make_pair()
        invite = self.cli("invite", "create", "--cap", "1000000", "--uses", "1", *_dd(self.a))
        limits = [*BUDGET, *RATE_LIMITS]
        key_a, key_b, token = self.finish(
            self.cli("keys", "create", "--name", "bench", *limits, "--json", *_dd(self.a)),
            self.cli("keys", "create", "--name", "bench", *limits, "--json", *_dd(self.b)),
            invite,
        )
        self.key, b_key = json.loads(key_a)["key"], json.loads(key_b)["key"]
        workers, granian = self._copy(self.a, "alpha-workers"), self._copy(self.a, "alpha-granian")
        self.default_workers = default_workers(workers.directory)
        self._serve(self.a, None, "--workers", "1")
        self._serve(self.b, None, "--workers", "1")
        self._serve(workers, None)  # the config's default
        self._serve(granian, None, "--workers", "1", "--server", "granian")
        # The processes each arm's requests pass through, for where the cores go (ARM_GROUPS).
        self.members = {
            "mock": [self.mock.pid],
            "nginx": [nginx.pid],
            "alpha": [self.a.process.pid],  # type: ignore[union-attr]
            "beta": [self.b.process.pid],  # type: ignore[union-attr]
            "alpha-workers": [workers.process.pid],  # type: ignore[union-attr]
            "alpha-granian": [granian.process.pid],  # type: ignore[union-attr]
        }
        self.targets = {
            "direct": plain_target("direct", self.mock_port),
            "nginx": plain_target("nginx", nginx_port),
            "node": self.a.target("node", self.key),
            "node_workers": workers.target("node_workers", self.key),
            "node_granian": granian.target("node_granian", self.key),
        }
        self.wait_answer(self.targets["direct"], self.mock, 30)
        self.wait_answer(self.targets["nginx"], nginx, 30)
        for node in (self.a, workers, granian):
            self.wait_answer(self.targets[_arm(node)], node.process, 90)
        self.wait_answer(self.b.target("beta", b_key, "echo"), self.b.process, 90)
        self.finish(self.cli("join", token.strip(), *_dd(self.b)))
        self.targets["hop"] = self.b.target("hop", b_key)
        self.wait_answer(self.targets["hop"], self.b.process, 30)
        self.say(f"every arm answers (default workers: {self.default_workers})")
        self.streams = {
            arm: Target(t.name, t.host, t.port, t.path, _streamed(t.body), t.headers)
            for arm, t in self.targets.items()
        }

    def latency(self) -> None:
        s = self.settings
        self.say(f"latency (httpx, keep-alive): {len(ARMS)} arms x {s.latency_rounds} rounds")
        self.seq: dict[str, list[tuple[float, float]]] = {arm: [] for arm in ARMS}
        clients = {arm: httpx.Client(timeout=30) for arm in ARMS}
        try:
            for client, arm in zip(clients.values(), ARMS, strict=True):
                sequential(client, self.targets[arm], 0.3)  # connect and warm the path
            for order in self.rounds(s.latency_rounds, ARMS):
                for arm in order:
                    times = sequential(clients[str(arm)], self.targets[str(arm)], s.latency_seconds)
                    self.seq[str(arm)].append((percentile(times, 0.5), percentile(times, 0.99)))
        finally:
            for client in clients.values():
                client.close()
        direct = self.seq["direct"]
        f = self.figures
        f.add("u_direct_p50_ms", [d[0] for d in direct], "ms", "direct: p50")
        f.add("u_direct_p99_ms", [d[1] for d in direct], "ms", "direct: p99")
        for arm in ARMS[1:]:
            for i, q in enumerate(("p50", "p99")):
                added = [r[i] - d[i] for r, d in zip(self.seq[arm], direct, strict=True)]
                f.add(f"u_{arm}_added_{q}_ms", added, "ms", f"{LABELS[arm]}: added {q}")
        for arm in ARMS[2:]:
            ratio = [
                (r[0] - d[0]) / max(n[0] - d[0], 1e-3)
                for r, n, d in zip(self.seq[arm], self.seq["nginx"], direct, strict=True)
            ]
            f.add(f"u_{arm}_over_nginx_p50", ratio, "x", f"{LABELS[arm]}: added p50 / nginx's")
        ratio = [
            (h[0] - d[0]) / max(n[0] - d[0], 1e-3)
            for h, n, d in zip(self.seq["hop"], self.seq["node"], direct, strict=True)
        ]
        f.add("u_hop_over_node_p50", ratio, "x", "hop's added p50 / one process's added p50")

    def streaming(self) -> None:
        s = self.settings
        self.say(f"streams (httpx): {len(ARMS)} arms x {s.stream_rounds} rounds")
        firsts: dict[str, list[float]] = {arm: [] for arm in ARMS}
        idles: dict[str, list[float]] = {arm: [] for arm in ARMS}
        clients = {arm: httpx.Client(timeout=30) for arm in ARMS}
        idle = s.chunk_gap_ms / 1000
        try:
            for arm in ARMS:
                first_bytes(clients[arm], self.streams[arm], 2)
            for order in self.rounds(s.stream_rounds, ARMS):
                for arm in order:
                    client, a = clients[str(arm)], str(arm)
                    times = first_bytes(client, self.streams[a], s.streams_per_round)
                    firsts[a].append(percentile(times, 0.5))
                    times = after_idle(client, self.targets[a], s.streams_per_round, idle)
                    idles[a].append(percentile(times, 0.5))
        finally:
            for client in clients.values():
                client.close()
        f = self.figures
        f.add("u_direct_ttfb_ms", firsts["direct"], "ms", "stream direct: first byte p50")
        for arm in ARMS[1:]:
            added = [r - d for r, d in zip(firsts[arm], firsts["direct"], strict=True)]
            f.add(
                f"u_{arm}_stream_added_ttfb_ms",
                added,
                "ms",
                f"stream {LABELS[arm]}: added first byte p50",
            )
            added = [r - d for r, d in zip(idles[arm], idles["direct"], strict=True)]
            f.add(
                f"u_{arm}_idle_added_p50_ms",
                added,
                "ms",
                f"{LABELS[arm]}: added p50, each request after {s.chunk_gap_ms:g} ms idle",
            )

    def throughput(self) -> None:
        s = self.settings
        self.say(
            f"throughput (wrk, c={CONCURRENCY}): {len(ARMS)} arms x {s.throughput_rounds} rounds"
        )
        runs: dict[str, list[Run]] = {arm: [] for arm in ARMS}
        self.splits: dict[str, list[Split]] = {arm: [] for arm in ARMS}
        for order in self.rounds(s.throughput_rounds, ARMS):
            for arm in order:
                target = self.targets[str(arm)]
                meter = Meter({g: self.members[g] for g in ARM_GROUPS[str(arm)]})
                with meter.run() as split:
                    run = run_wrk(target, CONCURRENCY, s.throughput_seconds, None, self.work)
                    split.requests = run.requests
                runs[str(arm)].append(run)
                self.splits[str(arm)].append(split)
        self.cores_figures()
        f = self.figures
        for arm in ARMS:
            f.add(
                f"u_{arm}_c32_rps",
                [r.rps for r in runs[arm]],
                "req/s",
                f"{LABELS[arm]}: req/s at c=32",
            )
            errors = float(sum(r.errors for r in runs[arm]))
            f.add(f"u_{arm}_c32_errors", errors, "", f"{LABELS[arm]}: errors at c=32")
        for arm in ARMS[2:]:
            ratio = [r.rps / n.rps for r, n in zip(runs[arm], runs["nginx"], strict=True)]
            f.add(f"u_{arm}_c32_of_nginx", ratio, "x", f"{LABELS[arm]}: req/s / nginx's")
        ratio = [w.rps / n.rps for w, n in zip(runs["node_workers"], runs["node"], strict=True)]
        label = f"default workers ({self.default_workers}) req/s / one process's"
        f.add("u_workers_over_one", ratio, "x", label)

    def placement(self) -> None:
        """The one-process arm at c=32 with everything sharing the cores, and with the node
        pinned to one core and the mock and wrk to the other (the pinned mode's placement),
        alternating in shuffled rounds on the same processes: whether the node's own CPU per
        request differs by where it runs, or only its share of the cores does."""
        s = self.settings
        cores = sorted(self.all_cpus)
        if len(cores) < 2:
            return
        node_cpus, other_cpus = {cores[0]}, set(cores[1:])
        alpha, mock = self.members["alpha"], self.members["mock"]
        self.say(f"placement (wrk, c={CONCURRENCY}): shared / pinned x {s.throughput_rounds}")
        found: dict[str, list[Split]] = {"shared": [], "pinned": []}
        rps: dict[str, list[float]] = {"shared": [], "pinned": []}
        try:
            for order in self.rounds(s.throughput_rounds, tuple(found)):
                for mode in order:
                    pinned = mode == "pinned"
                    place(alpha, node_cpus if pinned else self.all_cpus)
                    place(mock, other_cpus if pinned else self.all_cpus)
                    wrk_cpus = other_cpus if pinned else None
                    with Meter({"alpha": alpha, "mock": mock}).run() as split:
                        run = run_wrk(
                            self.targets["node"],
                            CONCURRENCY,
                            s.throughput_seconds,
                            wrk_cpus,
                            self.work,
                        )
                        split.requests = run.requests
                    found[str(mode)].append(split)
                    rps[str(mode)].append(run.rps)
        finally:
            place(alpha, self.all_cpus)
            place(mock, self.all_cpus)
        f = self.figures
        for mode, splits in found.items():
            what = (
                "shared cores" if mode == "shared" else "alpha on one core, mock + wrk on the other"
            )
            f.add(f"u_place_{mode}_rps", rps[mode], "req/s", f"one process, {what}: req/s at c=32")
            for group in ("alpha", "mock", "loadgen"):
                f.add(
                    f"u_place_{mode}_cpu_{group}_us",
                    [sp.groups[group].cpu_us for sp in splits],
                    "us/req",
                    f"one process, {what}: CPU of {group}",
                )
            f.add(
                f"u_place_{mode}_alpha_involuntary",
                [sp.groups["alpha"].involuntary for sp in splits],
                "/req",
                f"one process, {what}: alpha's involuntary context switches",
            )
        ratio = [
            p.groups["alpha"].cpu_us / max(sh.groups["alpha"].cpu_us, 1e-9)
            for p, sh in zip(found["pinned"], found["shared"], strict=True)
        ]
        f.add("u_place_cpu_pinned_over_shared", ratio, "x", "alpha's CPU/req: pinned / shared")

    def cores_figures(self) -> None:
        """Where the cores went in the throughput runs: each process group's CPU per request
        (medians over the rounds), the machine's busy, idle and stolen cores."""
        f = self.figures
        for arm in ARMS:
            splits = self.splits[arm]
            for group in (*ARM_GROUPS[arm], "loadgen"):
                f.add(
                    f"u_{arm}_c32_cpu_{group}_us",
                    [sp.groups[group].cpu_us for sp in splits],
                    "us/req",
                    f"{LABELS[arm]} at c=32: CPU of {group}",
                )
            node = ARM_GROUPS[arm][0]
            if node not in ("mock", "nginx"):
                usage = [sp.groups[node] for sp in splits]
                f.add(
                    f"u_{arm}_c32_cpu_{node}_other_us",
                    [u.other_us for u in usage],
                    "us/req",
                    f"{LABELS[arm]} at c=32: CPU of {node}'s threads but the loop",
                )
                f.add(
                    f"u_{arm}_c32_{node}_switches",
                    [u.voluntary + u.involuntary for u in usage],
                    "/req",
                    f"{LABELS[arm]} at c=32: {node}'s context switches (involuntary: "
                    f"{statistics.median(u.involuntary for u in usage):.2f})",
                )
            for what in ("busy", "idle", "steal"):
                f.add(
                    f"u_{arm}_c32_{what}_cores",
                    [getattr(sp, f"{what}_cores") for sp in splits],
                    "cores",
                    f"{LABELS[arm]} at c=32: machine's {what} cores",
                )
        self.cores_text = "\n".join(
            f"{arm} round {i}: {sp.requests / sp.seconds:,.0f} req/s; machine busy "
            f"{sp.busy_cores:.2f} idle {sp.idle_cores:.2f} steal {sp.steal_cores:.2f} cores; "
            f"unaccounted {sp.unaccounted_us():,.0f} us/req\n"
            + "\n".join(f"    {g}: {u.line()}" for g, u in sp.groups.items())
            for arm in ARMS
            for i, sp in enumerate(self.splits[arm])
        )

    def verdicts(self) -> list[dict[str, object]]:
        checks = [
            ("u_node_over_nginx_p50", "<=", 3.0, "added p50 <= 3x nginx's"),
            ("u_node_added_p99_ms", "<=", 3.0, "added p99 <= 3 ms"),
            ("u_node_stream_added_ttfb_ms", "<=", 0.7, "stream: added first byte <= 0.7 ms"),
            ("u_node_c32_of_nginx", ">=", 0.4, "one process at c=32 >= 40% of nginx"),
            ("u_workers_over_one", ">=", 1.8, "default workers >= 1.8x one process"),
            ("u_hop_over_node_p50", "<=", 2.0, "hop added <= 2x one process's"),
        ]
        out = []
        for name, op, target, what in checks:
            measured = self.figures.value(name)
            if math.isnan(measured):
                continue
            met = measured <= target if op == "<=" else measured >= target
            note = "met" if met else f"MISSED: {measured:.2f} against {target:g}"
            out.append(
                {"figure": name, "target": f"{op} {target:g}", "what": what, "met": met}
                | {"measured": round(measured, 4), "note": note}
            )
        return out

    def write(self, command: str) -> None:
        background = max(self.background.values(), default=0.0)
        load = os.getloadavg()
        self.notes.append(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        if background > 0.15:
            self.notes.append(f"other programs used up to {background:.2f} cores during a phase")
        fields = {
            "mode": "unpinned",
            "machine": {"cores": os.cpu_count(), "cores_available": len(self.all_cpus)},
            "default_workers": self.default_workers,
            "cores": {
                arm: [sp.as_dict() for sp in splits]
                for arm, splits in getattr(self, "splits", {}).items()
            },
        }
        cores = getattr(self, "cores_text", "")
        texts = [f"where the cores went at c=32 (per round):\n{cores}"] if cores else []
        self.publish(command, fields, texts)

    def versions(self) -> dict[str, str | None]:
        return super().versions() | {"nginx": _nginx_version()}


def _arm(node: Node) -> str:
    return {"alpha": "node", "alpha-workers": "node_workers", "alpha-granian": "node_granian"}[
        node.name
    ]


def _streamed(body: bytes) -> bytes:
    data = json.loads(body)
    data |= {"stream": True, "stream_options": {"include_usage": True}}
    return json.dumps(data, separators=(",", ":")).encode()


def _nginx_version() -> str | None:
    found = subprocess.run(
        [nginx_path() or "nginx", "-v"], capture_output=True, text=True, check=False
    )
    return found.stderr.strip().removeprefix("nginx version: ") or None


def run(settings: Settings, output: Path, keep: bool, command: str) -> None:
    os.chdir(HERE.parent)
    bench = Unpinned(settings, output, keep)
    try:
        bench.setup()
        for name, step in (
            ("latency", bench.latency),
            ("streaming", bench.streaming),
            ("throughput", bench.throughput),
            ("placement", bench.placement),
        ):
            with bench.phase(name):
                step()
        bench.write(command)
    finally:
        bench.close()
