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
- throughput: closed-loop load at concurrency 32 on one PostgreSQL process, then on both at once
  (16 connections each), requests per second, by `wrk` (one process per node, compiled: the
  load generator must not take the cores the nodes need; the Python generator where wrk is
  missing), with the machine's load average before and after (others' work shares the cores);
- `--profile SECONDS`: py-spy on both node processes while they take that load, summarised per
  request by layer (`bench/profile.py`), and the store's round trips per request counted from
  PostgreSQL's own statistics (`pg_stat_statements`-free: `pg_stat_database`'s transactions).
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
from bench.procs import CpuMeter
from bench.run import UPSTREAM_KEY_ENV, free_port, plain_target
from bench.surfaces import SURFACES, body
from tests.postgres import PostgresServer, postgres_server

HERE = Path(__file__).parent
PASSWORD_ENV = "AIHUB_BENCH_PG_PASSWORD"


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


def measure(work: Path, rounds: int, seconds: float, profile: float) -> dict[str, float | str]:
    os.environ.setdefault(UPSTREAM_KEY_ENV, "sk-bench-upstream")
    mock_port = free_port()
    mock = subprocess.Popen(
        [sys.executable, "-m", "bench.mock", "--port", str(mock_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    processes = [mock]
    try:
        with postgres_server() as server:
            os.environ[PASSWORD_ENV] = server.password
            database = server.create_database()
            url = server.url(database)
            lite = work / "sqlite-node"
            make_node(lite, "bench", mock_port)
            key = make_key(lite, "bench")
            first = work / "postgres-node"
            shutil.copytree(lite, first)  # the same node, its store then copied over
            on_postgres(first, url)
            second = host_copy(first, "postgres-node-2")
            ports = {name: free_port() for name in ("sqlite", "postgres", "postgres_2")}
            nodes: dict[str, subprocess.Popen[bytes]] = {}
            for name, folder in (("sqlite", lite), ("postgres", first), ("postgres_2", second)):
                nodes[name] = serve(folder, ports[name], work / f"{name}.log")
                processes.append(nodes[name])
            arms = {
                "direct": plain_target("direct", mock_port),
                **{name: target(name, port, key) for name, port in ports.items()},
            }
            for arm in arms.values():
                wait_answer(arm)
            figures = _figures(arms, rounds, seconds, work)
            figures.update(_two_processes(arms, nodes, seconds, work, server, database, profile))
            return figures
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


def _figures(
    arms: dict[str, Target], rounds: int, seconds: float, work: Path
) -> dict[str, float | str]:
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
    nodes: dict[str, subprocess.Popen[bytes]],
    seconds: float,
    work: Path,
    server: PostgresServer,
    database: str,
    profile: float,
) -> dict[str, float | str]:
    """One PostgreSQL process at concurrency 32, then both at 16 each: requests per second,
    the node processes' CPU per request, and the database's transactions per request."""
    pg = [nodes["postgres"], nodes["postgres_2"]]
    figures: dict[str, float | str] = {"load_before": os.getloadavg()[0]}
    one = _metered([arms["postgres"]], 32, seconds * 2, work, pg[:1], server)
    two = _metered([arms["postgres"], arms["postgres_2"]], 16, seconds * 2, work, pg, server)
    figures.update(
        {
            "postgres_one_process_rps_c32": one.rps,
            "postgres_two_processes_rps_c32": two.rps,
            "two_over_one": two.rps / one.rps if one.rps else 0.0,
            # What the node processes got of the cores, and what each request cost them: with
            # the cost per request the same for two as for one, the ratio above is the share
            # of the machine the two got, not a limit of the store.
            "node_cores_used_one": one.node_cores,
            "node_cores_used_two": two.node_cores,
            "node_cpu_us_per_request_one": one.node_us,
            "node_cpu_us_per_request_two": two.node_us,
            "db_cpu_us_per_request_one": one.db_us,
            "db_cpu_us_per_request_two": two.db_us,
            "db_transactions_per_request_one": one.transactions,
            "db_transactions_per_request_two": two.transactions,
            "load_after": os.getloadavg()[0],
        }
    )
    if profile > 0:
        figures["profile"] = _profile(arms, pg, profile, work)
    return figures


def _committed(server: PostgresServer) -> int:
    """Transactions committed in the whole cluster so far (statements on their own count
    one each): the bench's database is the only one in use."""
    return int(server.psql("SELECT sum(xact_commit) FROM pg_stat_database").strip())


class Metered(NamedTuple):
    rps: float
    node_cores: float  # CPU seconds the node processes used per second of the run
    node_us: float  # node CPU per request
    db_us: float  # PostgreSQL's CPU (every backend) per request
    transactions: float  # committed by the database per request


def _metered(
    arms: list[Target],
    connections: int,
    seconds: float,
    work: Path,
    nodes: list[subprocess.Popen[bytes]],
    server: PostgresServer,
) -> Metered:
    """Load on `arms`, and what it cost the node processes and the database."""
    postmaster = int((server.folder / "data" / "postmaster.pid").read_text().split()[0])
    meters = [CpuMeter(node.pid) for node in nodes]
    database = CpuMeter(postmaster)
    before = _committed(server)
    for meter in (*meters, database):
        meter.start()
    rps = together(arms, connections, seconds, work)
    used = sum(meter.stop()[0] for meter in meters)
    db_used = database.stop()[0]
    committed = _committed(server) - before
    requests = max(rps * seconds, 1)
    return Metered(
        rps, used / seconds, used / requests * 1e6, db_used / requests * 1e6, committed / requests
    )


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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--profile", type=float, default=0.0, metavar="SECONDS",
        help="py-spy both PostgreSQL node processes for this long under load",
    )  # fmt: skip
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aihub-bench-pg-") as work:
        figures = measure(Path(work), args.rounds, args.seconds, args.profile)
    profile = figures.pop("profile", None)
    for name, value in figures.items():
        shown = f"{value:10.3f}" if isinstance(value, float) else f"{value:>10}"
        print(f"{name:34} {shown}")
    if profile:
        print(profile)


if __name__ == "__main__":
    main()
