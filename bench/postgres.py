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
  (16 connections each), requests per second.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.loadgen import Run, Target, run_python
from bench.run import BUDGET, RATE_LIMITS, UPSTREAM_KEY_ENV, free_port, once, plain_target
from bench.surfaces import SURFACES, body
from tests.postgres import postgres_server

AIHUB = Path(sys.executable).parent / "aihub"
PASSWORD_ENV = "AIHUB_BENCH_PG_PASSWORD"


def aihub(*args: str) -> str:
    done = subprocess.run([str(AIHUB), *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"aihub {' '.join(args)}: {done.stdout}{done.stderr}")
    return done.stdout


def make_node(folder: Path, mock_port: int) -> str:
    """A node serving the mock as `mock`; the key every arm uses."""
    aihub("init", "--name", "bench", "--data-dir", str(folder))
    with (folder / "config.toml").open("a") as config:
        config.write(
            '\n[[models]]\nname = "mock"\nprovider = "openai"\nmodel = "mock-model"\n'
            f'base_url = "http://127.0.0.1:{mock_port}/v1"\napi_key_env = "{UPSTREAM_KEY_ENV}"\n'
            "price_in = 150_000\nprice_out = 600_000\n"
        )
    created = aihub(
        "keys", "create", "--name", "bench", *BUDGET, *RATE_LIMITS, "--json",
        "--data-dir", str(folder),
    )  # fmt: skip
    return json.loads(created)["key"]


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


def serve(folder: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    # One worker each (the default is one per core): the arm compares one process with two.
    command = [str(AIHUB), "serve", "--workers", "1", "--port", str(port)]
    command += ["--data-dir", str(folder)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("ab"))


def target(name: str, port: int, key: str) -> Target:
    chat = SURFACES["chat"]
    return Target(name, "127.0.0.1", port, chat.path, body("chat", "mock"), chat.headers(key))


def wait_answer(arm: Target, limit: float = 90) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if once(arm)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{arm.name} does not answer")


def together(arms: list[Target], connections: int, seconds: float) -> float:
    """Closed-loop load on every arm at once; requests per second in all."""
    runs: list[Run] = []
    threads = [
        threading.Thread(
            target=lambda a=arm: runs.append(run_python(a, connections, seconds, None))
        )
        for arm in arms
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if any(run.errors for run in runs):
        raise RuntimeError(f"errors under load: {[run.errors for run in runs]}")
    return sum(run.rps for run in runs)


def measure(work: Path, rounds: int, seconds: float) -> dict[str, float]:
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
            url = server.url(server.create_database())
            lite = work / "sqlite-node"
            key = make_node(lite, mock_port)
            first = work / "postgres-node"
            shutil.copytree(lite, first)  # the same node, its store then copied over
            on_postgres(first, url)
            second = host_copy(first, "postgres-node-2")
            ports = {name: free_port() for name in ("sqlite", "postgres", "postgres_2")}
            for name, folder in (("sqlite", lite), ("postgres", first), ("postgres_2", second)):
                processes.append(serve(folder, ports[name], work / f"{name}.log"))
            arms = {
                "direct": plain_target("direct", mock_port),
                **{name: target(name, port, key) for name, port in ports.items()},
            }
            for arm in arms.values():
                wait_answer(arm)
            return _figures(arms, rounds, seconds)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


def _figures(arms: dict[str, Target], rounds: int, seconds: float) -> dict[str, float]:
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
    one = together([arms["postgres"]], 32, seconds * 2)
    two = together([arms["postgres"], arms["postgres_2"]], 16, seconds * 2)
    return {
        "sqlite_added_p50_ms": added["sqlite"],
        "postgres_added_p50_ms": added["postgres"],
        "postgres_over_sqlite_p50_ms": added["postgres"] - added["sqlite"],
        "postgres_one_process_rps_c32": one,
        "postgres_two_processes_rps_c32": two,
        "two_over_one": two / one if one else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aihub-bench-pg-") as work:
        figures = measure(Path(work), args.rounds, args.seconds)
    for name, value in figures.items():
        print(f"{name:34} {value:10.3f}")


if __name__ == "__main__":
    main()
