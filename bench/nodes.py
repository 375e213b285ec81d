"""What the benches that drive real `aihub serve` processes through the command line share
(bench/postgres.py, bench/governance.py): making a node that serves the bench's mock, its keys,
serving it, and waiting until it answers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from bench.loadgen import Target
from bench.run import BUDGET, RATE_LIMITS, UPSTREAM_KEY_ENV, once

AIHUB = Path(sys.executable).parent / "aihub"


def aihub(*args: str) -> str:
    done = subprocess.run([str(AIHUB), *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"aihub {' '.join(args)}: {done.stdout}{done.stderr}")
    return done.stdout


def make_node(folder: Path, name: str, mock_port: int, extra: str = "") -> None:
    """A node serving the mock as `mock`, with `extra` appended to its config."""
    aihub("init", "--name", name, "--data-dir", str(folder))
    with (folder / "config.toml").open("a") as config:
        config.write(
            '\n[[models]]\nname = "mock"\nprovider = "openai"\nmodel = "mock-model"\n'
            f'base_url = "http://127.0.0.1:{mock_port}/v1"\napi_key_env = "{UPSTREAM_KEY_ENV}"\n'
            "price_in = 150_000\nprice_out = 600_000\n" + extra
        )


def make_key(folder: Path, name: str, *extra: str) -> str:
    """A key with the bench's budget and rate limits (never reached), so that every request
    reserves, takes its limits and settles."""
    created = aihub(
        "keys", "create", "--name", name, *BUDGET, *RATE_LIMITS, *extra, "--json",
        "--data-dir", str(folder),
    )  # fmt: skip
    return json.loads(created)["key"]


def serve(folder: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    # One worker (the default is one per core): each arm is one process, the figures say so.
    command = [str(AIHUB), "serve", "--workers", "1", "--port", str(port)]
    command += ["--data-dir", str(folder)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("ab"))


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
