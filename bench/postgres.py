"""The PostgreSQL arm (`make bench-postgres`, `python -m bench.postgres`): what a node on
PostgreSQL adds to a request over the same node on SQLite, and what two processes on one
database sustain against one.

Everything runs on loopback: the bench's mock upstream, a PostgreSQL server started as the test
suite starts one (`tests/postgres.py`), one node on SQLite and the same node copied into
PostgreSQL (`aihub db copy`) and served by two processes, each with a data folder of its own,
as two hosts would be. Every request uses a key with a budget and rate limits (as the main
bench's `node` arm does), so that each one reserves, takes its limits and settles in the store.

- latency: sequential requests (concurrency 1) to the mock directly, to the SQLite node and to
  the PostgreSQL node, in shuffled order each round; the added p50 of each over the mock's;
- throughput: closed-loop load at concurrency 32 on one PostgreSQL process, and on both at
  once (16 connections each), by `wrk` (one process per node, compiled: the load generator
  must not take the cores the nodes need; the Python generator where wrk is missing), after a
  warm-up of each, then alternated for `--throughput-rounds` rounds; requests per second, the
  median of the rounds' ratios, and what each request cost every part of the machine, the
  statements the database ran for it and its lock waits (`bench/pg_meter.py`), with the
  machine's load average before and after (others' work shares the cores);
- `--profile SECONDS`: py-spy on both node processes while they take that load, summarised per
  request by layer (`bench/profile.py`).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

from bench.loadgen import Run, Target, run_python, run_wrk, wrk_path
from bench.nodes import aihub, make_key, make_node, serve, wait_answer
from bench.pg_meter import (
    SETTINGS,
    CpuSplit,
    Split,
    Statement,
    Waits,
    WaitSampler,
    enable_statements,
    load_average,
    read_statements,
    reset_statements,
)
from bench.procs import CpuMeter
from bench.run import UPSTREAM_KEY_ENV, free_port, plain_target
from bench.surfaces import SURFACES, body
from tests.postgres import PostgresServer, postgres_server

HERE = Path(__file__).parent
PASSWORD_ENV = "AIHUB_BENCH_PG_PASSWORD"
WARM_UP = 3.0  # seconds of each throughput arm's load before anything is measured


def on_postgres(folder: Path, url: str) -> None:
    aihub("db", "copy", "--to", url, "--password-env", PASSWORD_ENV, "--data-dir", str(folder))
    path = folder / "config.toml"
    text = path.read_text().replace(
        'url = ""', f'url = "{url}"\npassword_env = "{PASSWORD_ENV}"', 1
    )
    path.write_text(text)


def host_copy(folder: Path, name: str) -> Path:
    other = folder.parent / name
    shutil.copytree(folder, other, ignore=shutil.ignore_patterns("journal", "*.epoch", "aihub.db*"))
    return other


def target(name: str, port: int, key: str) -> Target:
    chat = SURFACES["chat"]
    return Target(name, "127.0.0.1", port, chat.path, body("chat", "mock"), chat.headers(key))


def load(arm: Target, connections: int, seconds: float, work: Path) -> Run:
    """Closed-loop load on one arm: wrk where it is installed, else the Python generator."""
    if wrk_path() is not None:
        return run_wrk(arm, connections, seconds, None, work)
    return run_python(arm, connections, seconds, None)


def together(arms: list[Target], connections: int, seconds: float, work: Path) -> float:
    """Closed-loop load on every arm at once (a generator each); requests per second in all."""
    runs: list[Run] = []
    threads = [
        threading.Thread(target=lambda a=arm: runs.append(load(a, connections, seconds, work)))
        for arm in arms
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if any(run.errors for run in runs):
        raise RuntimeError(f"errors under load: {[run.errors for run in runs]}")
    return sum(run.rps for run in runs)


class Settings(NamedTuple):
    rounds: int  # of the latency phase (0: none)
    throughput_rounds: int  # of one process and two, alternated
    seconds: float
    profile: float


def measure(work: Path, settings: Settings) -> tuple[dict[str, float | str], str]:
    """Every figure, and the report of what the throughput phase cost each part."""
    os.environ.setdefault(UPSTREAM_KEY_ENV, "sk-bench-upstream")
    mock_port = free_port()
    mock = subprocess.Popen(
        [sys.executable, "-m", "bench.mock", "--port", str(mock_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    processes = {"mock": mock}
    try:
        with postgres_server(SETTINGS) as server:
            os.environ[PASSWORD_ENV] = server.password
            database = server.create_database()
            enable_statements(server, database)
            url = server.url(database)
            lite = work / "sqlite-node"
            make_node(lite, "bench", mock_port)
            key = make_key(lite, "bench")
            first = work / "postgres-node"
            shutil.copytree(lite, first)  # the same node, its store then copied over
            on_postgres(first, url)
            second = host_copy(first, "postgres-node-2")
            ports = {name: free_port() for name in ("sqlite", "postgres", "postgres_2")}
            for name, folder in (("sqlite", lite), ("postgres", first), ("postgres_2", second)):
                processes[name] = serve(folder, ports[name], work / f"{name}.log")
            arms = {
                "direct": plain_target("direct", mock_port),
                **{name: target(name, port, key) for name, port in ports.items()},
            }
            for arm in arms.values():
                wait_answer(arm)
            figures = _figures(arms, settings.rounds, settings.seconds) if settings.rounds else {}
            throughput, report = _two_processes(
                arms, processes, settings.seconds, work, server, database,
                settings.throughput_rounds,
            )  # fmt: skip
            figures.update(throughput)
            if settings.profile > 0:
                pg = [processes["postgres"], processes["postgres_2"]]
                report += "\n" + _profile(arms, pg, settings.profile, work)
            return figures, report
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            process.wait(timeout=30)


def _figures(arms: dict[str, Target], rounds: int, seconds: float) -> dict[str, float | str]:
    p50: dict[str, list[float]] = {name: [] for name in ("direct", "sqlite", "postgres")}
    for _ in range(rounds):
        order = list(p50)
        random.shuffle(order)
        for name in order:
            run = run_python(arms[name], 1, seconds, None)
            if run.errors:
                raise RuntimeError(f"{name}: {run.errors} errors")
            p50[name].append(run.p50_ms)
    added = {
        name: statistics.median(a - d for a, d in zip(p50[name], p50["direct"], strict=True))
        for name in ("sqlite", "postgres")
    }
    return {
        "load_generator": "wrk" if wrk_path() else "python",
        "sqlite_added_p50_ms": added["sqlite"],
        "postgres_added_p50_ms": added["postgres"],
        "postgres_over_sqlite_p50_ms": added["postgres"] - added["sqlite"],
    }


def _two_processes(
    arms: dict[str, Target],
    processes: dict[str, subprocess.Popen[bytes]],
    seconds: float,
    work: Path,
    server: PostgresServer,
    database: str,
    rounds: int,
) -> tuple[dict[str, float | str], str]:
    """One PostgreSQL process at concurrency 32 and both at 16 each, alternated for `rounds`
    rounds (one first in even rounds, two first in odd ones), so that both arms see the
    same load: requests per second of each, the median of the rounds' ratios, and what a
    request cost every part of the machine and the database (the report's text)."""
    pg = [processes["postgres"], processes["postgres_2"]]
    one_arm, two_arms = [arms["postgres"]], [arms["postgres"], arms["postgres_2"]]
    meter = {"server": server, "database": database, "mock": processes["mock"], "work": work}
    # Warm up first: each process's pool opens the connections this load keeps busy (a new
    # connection costs the server a backend, its password check and its catalog caches:
    # ~0.1 s of CPU each here, which is no part of a request's cost in a running node).
    together(one_arm, 32, WARM_UP, work)
    together(two_arms, 16, WARM_UP, work)
    load_before = load_average()
    ones: list[Metered] = []
    twos: list[Metered] = []
    for round_ in range(rounds):
        for arm in ("one", "two") if round_ % 2 == 0 else ("two", "one"):
            if arm == "one":
                ones.append(_metered(one_arm, 32, seconds * 2, pg[:1], **meter))
            else:
                twos.append(_metered(two_arms, 16, seconds * 2, pg, **meter))
    ratios = [two.rps / one.rps if one.rps else 0.0 for one, two in zip(ones, twos, strict=True)]
    figures: dict[str, float | str] = {
        "load_before": load_before,
        "postgres_one_process_rps_c32": statistics.median(one.rps for one in ones),
        "postgres_two_processes_rps_c32": statistics.median(two.rps for two in twos),
        "two_over_one": statistics.median(ratios),
        "two_over_one_rounds": " ".join(f"{ratio:.2f}" for ratio in ratios),
        # Derived, not measured: the ratio the rounds' CPU costs give on a machine nobody else
        # uses (`_alone`), for runs that shared it (the `others` below say how much).
        "two_over_one_alone": statistics.median(
            _alone(one, two) for one, two in zip(ones, twos, strict=True)
        ),
        # What the node processes got of the cores, and what each request cost them: with
        # the cost per request the same for two as for one, the ratio above is the share
        # of the machine the two got, not a limit of the store.
        "node_cores_used_one": statistics.median(one.split.cores()["nodes"] for one in ones),
        "node_cores_used_two": statistics.median(two.split.cores()["nodes"] for two in twos),
        "db_transactions_per_request_one": statistics.median(one.transactions for one in ones),
        "db_transactions_per_request_two": statistics.median(two.transactions for two in twos),
        "load_after": load_average(),
    }
    return figures, _report(ones, twos)


def _alone(one: Metered, two: Metered) -> float:
    """What two over one would be if the bench had the machine to itself: one process can use
    at most one core, so it serves a request per its own CPU per request; two processes share
    every core with PostgreSQL, the mock, the load generators and the bench, so they serve
    the machine's cores over everything a request costs them all."""
    costs = two.split.per_request(two.requests)
    ours = sum(us for name, us in costs.items() if name != "others")
    node_one = one.split.per_request(one.requests)["node_1"]
    return len(os.sched_getaffinity(0)) * node_one / ours if ours else 0.0


def _committed(server: PostgresServer) -> int:
    """Transactions committed in the whole cluster so far (statements on their own count
    one each): the bench's database is the only one in use."""
    return int(server.psql("SELECT sum(xact_commit) FROM pg_stat_database").strip())


class Metered(NamedTuple):
    rps: float
    requests: float
    split: Split  # CPU of every part of the machine over the run
    transactions: float  # committed by the database per request
    statements: list[Statement]  # what the database ran over the run
    waits: Waits  # what the node's backends were doing, sampled


def _metered(
    arms: list[Target],
    connections: int,
    seconds: float,
    nodes: list[subprocess.Popen[bytes]],
    *,
    server: PostgresServer,
    database: str,
    mock: subprocess.Popen[bytes],
    work: Path,
) -> Metered:
    """Load on `arms`, and what it cost each part of the machine and the database."""
    postmaster = int((server.folder / "data" / "postmaster.pid").read_text().split()[0])
    split = CpuSplit([node.pid for node in nodes], postmaster, mock.pid)
    reset_statements(server, database)
    before = _committed(server)
    sampler = WaitSampler(server, database)
    sampler.start()
    split.start()
    rps = together(arms, connections, seconds, work)
    used = split.stop()
    waits = sampler.stop()
    committed = _committed(server) - before
    statements = read_statements(server, database)
    requests = max(rps * seconds, 1)
    return Metered(rps, requests, used, committed / requests, statements, waits)


def _report(ones: list[Metered], twos: list[Metered]) -> str:
    """The CPU split and the statements per request, one arm beside the other (medians of
    the rounds), and the lock waits seen."""
    lines = ["", "CPU per request (µs, median of rounds)      one process   two processes"]
    names = list(twos[0].split.per_request(1))
    for name in names:
        one = [m.split.per_request(m.requests).get(name) for m in ones]
        two = [m.split.per_request(m.requests)[name] for m in twos]
        shown = f"{statistics.median(one):12.0f}" if None not in one else f"{'-':>12}"
        lines.append(f"  {name:40} {shown} {statistics.median(two):15.0f}")
    lines.append("cores taken (median of rounds)")
    for name in ones[0].split.cores():
        one = statistics.median(m.split.cores()[name] for m in ones)
        two = statistics.median(m.split.cores()[name] for m in twos)
        lines.append(f"  {name:40} {one:12.2f} {two:15.2f}")
    lines.append("statements per request (the last round of each; calls, exec µs per call)")
    one_calls = {s.query: s for s in ones[-1].statements}
    for statement in twos[-1].statements[:25]:
        mine = one_calls.get(statement.query)
        per_one = f"{mine.calls / ones[-1].requests:6.3f}" if mine else f"{'-':>6}"
        per_two = statement.calls / twos[-1].requests
        exec_us = statement.exec_ms * 1000 / max(statement.calls, 1)
        lines.append(f"  {per_one} {per_two:6.3f} {exec_us:7.1f}  {statement.query[:110]}")
    total_one = sum(s.calls for s in ones[-1].statements) / ones[-1].requests
    total_two = sum(s.calls for s in twos[-1].statements) / twos[-1].requests
    lines.append(f"  {total_one:6.3f} {total_two:6.3f}  in all")
    for label, runs in (("one", ones), ("two", twos)):
        waits = runs[-1].waits
        locks = ", ".join(f"{event} {n}" for event, n in waits.locks.most_common()) or "none"
        lines.append(
            f"backends sampled ({label}, {waits.samples} samples): running {waits.active},"
            f" idle in a transaction {waits.idle_in_transaction}, waiting on a lock: {locks}"
        )
    return "\n".join(lines)


def _profile(
    arms: dict[str, Target], nodes: list[subprocess.Popen[bytes]], seconds: float, work: Path
) -> str:
    """py-spy on both node processes while both take the load: where a request's CPU goes."""
    from bench.profile import render, summarise

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return "profile skipped: py-spy is not installed (pip install py-spy)"
    spies = []
    for node in nodes:
        out = work / f"profile-{node.pid}.txt"
        command = [spy, "record", "-p", str(node.pid), "-d", str(math.ceil(seconds) + 1)]
        command += ["-r", "250", "-f", "raw", "-o", str(out)]
        spies.append((out, subprocess.Popen(command, stdout=subprocess.DEVNULL)))
    meters = [CpuMeter(node.pid) for node in nodes]
    for meter in meters:
        meter.start()
    rps = together([arms["postgres"], arms["postgres_2"]], 16, seconds, work)
    used = [meter.stop()[0] for meter in meters]
    texts = []
    for (out, process), cpu in zip(spies, used, strict=True):
        process.wait(timeout=120)
        if not out.exists():
            return "profile failed: py-spy wrote nothing (ptrace permission?)"
        shutil.copy(out, HERE / f"profile-postgres-{len(texts) + 1}.txt")
        requests = rps * seconds / len(nodes)
        texts.append(render(summarise(out.read_text(), cpu / max(requests, 1) * 1e6)))
    return "\n".join(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="of the latency phase (0: none)")
    parser.add_argument(
        "--throughput-rounds", type=int, default=3,
        help="rounds of one process and of two, alternated (the figure: the median ratio)",
    )  # fmt: skip
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--profile", type=float, default=0.0, metavar="SECONDS",
        help="py-spy both PostgreSQL node processes for this long under load",
    )  # fmt: skip
    args = parser.parse_args()
    settings = Settings(args.rounds, max(args.throughput_rounds, 1), args.seconds, args.profile)
    with tempfile.TemporaryDirectory(prefix="aihub-bench-pg-") as work:
        figures, report = measure(Path(work), settings)
    for name, value in figures.items():
        shown = f"{value:10.3f}" if isinstance(value, float) else f"{value:>10}"
        print(f"{name:34} {shown}")
    print(report)


if __name__ == "__main__":
    main()
