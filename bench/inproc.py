"""The node's own CPU per request, in-process: no server, no socket, no upstream.

The app (`create_app`) is driven through ASGI directly, the echo model answering, from a key
with the bench's budget and rate limits (`--key plain`: none), paced at `--rate` requests a
second so that the usage writer batches as it does under that load. What is measured is this
process's CPU (its own thread and the store's, `time.process_time`) per request, and the
event loop's thread alone (`time.thread_time`): on a shared 2-core machine, a figure small
cuts can be seen in, where a served node's CPU meter moves by more than they save.

    .venv/bin/python -m bench.inproc                     # 4 rounds of 1,500 requests at 100/s
    .venv/bin/python -m bench.inproc --rate 0            # back to back
    .venv/bin/python -m bench.inproc --profile out.pstats  # cProfile the last round: calls
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import logging.config
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.run import BUDGET, RATE_LIMITS
from bench.surfaces import body

AIHUB = Path(sys.executable).parent / "aihub"


def _aihub(*args: str) -> str:
    return subprocess.run([str(AIHUB), *args], capture_output=True, text=True, check=True).stdout


class Driver:
    """An app and its lifespan, asked over ASGI."""

    def __init__(self, app: Any, key: str) -> None:
        self.app = app
        self.request = body("chat", "echo")
        self.headers = [
            (b"host", b"127.0.0.1"),
            (b"authorization", f"Bearer {key}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self.request)).encode()),
        ]
        self._lifespan: asyncio.Task[None] | None = None
        self._to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def start(self) -> None:
        async def receive() -> dict[str, Any]:
            return await self._to_app.get()

        async def send(message: dict[str, Any]) -> None:
            await self._from_app.put(message)

        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._lifespan = asyncio.create_task(self.app(scope, receive, send))
        await self._to_app.put({"type": "lifespan.startup"})
        answer = await self._from_app.get()
        if answer["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"startup: {answer}")

    async def stop(self) -> None:
        await self._to_app.put({"type": "lifespan.shutdown"})
        await self._from_app.get()
        assert self._lifespan is not None
        await self._lifespan

    async def ask(self) -> int:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "query_string": b"",
            "root_path": "",
            "headers": self.headers,
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 8787),
            "state": {},
        }
        sent = False
        status = 0

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                await asyncio.Event().wait()  # the client stays: no disconnect
            sent = True
            return {"type": "http.request", "body": self.request, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await self.app(scope, receive, send)
        return status


async def _round(driver: Driver, count: int, rate: float) -> tuple[float, float]:
    """`count` requests at `rate` a second: (process CPU, loop thread CPU) per request, µs."""
    gap = 1.0 / rate if rate else 0.0
    cpu, thread = time.process_time(), time.thread_time()
    start = time.monotonic()
    for n in range(count):
        status = await driver.ask()
        if status != 200:
            raise RuntimeError(f"request {n} answered {status}")
        if gap:
            # Pacing, as a load generator at that rate would: the usage writer batches what
            # arrives in its 50 ms, as in a served node.
            await asyncio.sleep(max(0.0, start + (n + 1) * gap - time.monotonic()))
    # What the last requests queued is written inside the round: its store work is counted.
    await driver.app.state.hub.usage.flush()
    cpu, thread = time.process_time() - cpu, time.thread_time() - thread
    return cpu / count * 1e6, thread / count * 1e6


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from node.app import create_app
    from node.observe.logs import log_config

    # As `aihub serve` logs (the access line included; stderr: send it to a file): its cost counts.
    logging.config.dictConfig(log_config("info"))

    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / "node"
        _aihub("init", "--name", "inproc", "--data-dir", str(folder))
        limits = [*BUDGET, *RATE_LIMITS] if args.key == "limits" else []
        created = _aihub(
            "keys", "create", "--name", "b", *limits, "--json", "--data-dir", str(folder)
        )
        # `serving`: the collector settled as in `aihub serve` (node/collector.py).
        driver = Driver(create_app(folder, serving=True), json.loads(created)["key"])
        await driver.start()
        try:
            for _ in range(args.warmup):
                await driver.ask()
            rounds = []
            for n in range(args.rounds):
                profile = cProfile.Profile() if args.profile and n == args.rounds - 1 else None
                if profile is not None:
                    profile.enable()
                rounds.append(await _round(driver, args.requests, args.rate))
                if profile is not None:
                    profile.disable()
                    profile.dump_stats(args.profile)
                    # Deterministic where the times are not: Python calls per request.
                    calls = pstats.Stats(profile).total_calls / args.requests  # type: ignore[attr-defined]
                    print(f"profiled round: {calls:,.1f} Python function calls per request")
                print(f"round {n + 1}: {rounds[-1][0]:,.0f} µs process, {rounds[-1][1]:,.0f} loop")
        finally:
            await driver.stop()
    process = statistics.median(r[0] for r in rounds)
    thread = statistics.median(r[1] for r in rounds)
    print(f"median of {len(rounds)}: {process:,.0f} µs process CPU, {thread:,.0f} µs loop thread")
    return {"process_us": process, "thread_us": thread, "rounds": rounds}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--key", choices=["limits", "plain"], default="limits")
    parser.add_argument("--rate", type=float, default=100.0, help="requests a second; 0: flat out")
    parser.add_argument("--requests", type=int, default=1500, help="per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--profile", help="write cProfile stats of the last round here")
    return parser.parse_args(argv)


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(parse()))
