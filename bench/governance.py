"""The governance arm (`python -m bench.governance`, run by `make bench`): what the guardrails
and the response cache cost, or save, per request through a running node.

Everything runs on loopback: the bench's mock upstream and two nodes serving it, each a real
`aihub serve` process. One node has no `[guardrails]` at all ("off": nothing of the stage is
built); the other has the default profile the README suggests (size, secrets, prompt
injection, PII), attached to one key only, so that another key of the same node has no
profile. Every request is the same 1 KB chat prompt (business prose with figures and no PII
in it: the checks read all of it and find nothing, the common case), from a key with a
budget and rate limits as the main bench's `node` arm has, sequentially (concurrency 1), each
arm in shuffled order each round:

- `off`: the node without guardrails; `unprofiled`: the node with profiles, a key none applies
  to (target: no difference from `off` within noise);
- `profiled`: the same node, the key with the default profile (target: at most 1 ms more p50
  than `unprofiled`);
- `cache_hit`: the node without guardrails, a key with the response cache on, asked the same
  request again and again (every request but the first is a hit), against `direct` (the mock
  itself) and against `off` (the same request asked of the upstream through the node).

The figures are ratios and differences of p50s measured in the same rounds, and the machine's
load average is printed with them: on a shared machine only those compare.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.loadgen import Target, run_python
from bench.nodes import make_key, make_node, serve, wait_answer
from bench.run import UPSTREAM_KEY_ENV, free_port
from bench.surfaces import MAX_TOKENS, SURFACES, SYSTEM

# A 1 KB prompt of ordinary business prose with figures in it (digits, decimal points, a
# colon), so that every PII recognizer reads it: a text without digits skips most of them.
PROMPT = (
    "Please summarise the quarterly report for the board: revenue was 4.2 million in Q3 "
    "2026, up 12% on the 3.75 million of Q3 2025, with costs flat at 2.1 million. "
) * 8
PROMPT = PROMPT[:1024]
PROFILE = """
[guardrails]
keys = { guarded = "standard" }

[guardrails.profiles.standard]
checks = [
  { kind = "size", max_chars = 100000 },
  { kind = "secrets", action = "block" },
  { kind = "injection", action = "block" },
  { kind = "pii", action = "redact" },
]
"""
ARMS = ("direct", "off", "unprofiled", "profiled", "cache_hit")


def request_body() -> bytes:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]
    data = {"model": "mock", "messages": messages, "max_tokens": MAX_TOKENS}
    return json.dumps(data, separators=(",", ":")).encode()


def target(name: str, port: int, key: str | None) -> Target:
    chat = SURFACES["chat"]
    headers = chat.headers(key) if key else {}
    return Target(name, "127.0.0.1", port, chat.path, request_body(), headers)


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
        off, guarded = work / "off", work / "guarded"
        make_node(off, off.name, mock_port)
        make_node(guarded, guarded.name, mock_port, PROFILE)
        plain = make_key(off, "plain")
        cached = make_key(off, "cached", "--cache", "on")
        unprofiled = make_key(guarded, "unprofiled")
        profiled = make_key(guarded, "guarded")
        ports = {"off": free_port(), "guarded": free_port()}
        for name, folder in (("off", off), ("guarded", guarded)):
            processes.append(serve(folder, ports[name], work / f"{name}.log"))
        arms = {
            "direct": target("direct", mock_port, None),
            "off": target("off", ports["off"], plain),
            "unprofiled": target("unprofiled", ports["guarded"], unprofiled),
            "profiled": target("profiled", ports["guarded"], profiled),
            "cache_hit": target("cache_hit", ports["off"], cached),
        }
        for arm in arms.values():
            wait_answer(arm)  # the cache's first answer kept here: the rest are hits
        return figures(arms, rounds, seconds)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


def figures(arms: dict[str, Target], rounds: int, seconds: float) -> dict[str, float]:
    load_before = os.getloadavg()[0]
    p50: dict[str, list[float]] = {name: [] for name in ARMS}
    for _ in range(rounds):
        order = list(ARMS)
        random.shuffle(order)
        for name in order:
            run = run_python(arms[name], 1, seconds, None)
            if run.errors:
                raise RuntimeError(f"{name}: {run.errors} errors")
            p50[name].append(run.p50_ms)

    def median_of(a: str, b: str, op: str) -> float:
        pairs = zip(p50[a], p50[b], strict=True)
        values = [x - y if op == "-" else x / y for x, y in pairs]
        return statistics.median(values)

    return {
        **{f"{name}_p50_ms": statistics.median(p50[name]) for name in ARMS},
        "unprofiled_minus_off_p50_ms": median_of("unprofiled", "off", "-"),
        "unprofiled_over_off": median_of("unprofiled", "off", "/"),
        "profile_added_p50_ms": median_of("profiled", "unprofiled", "-"),
        "profiled_over_unprofiled": median_of("profiled", "unprofiled", "/"),
        "cache_hit_over_direct": median_of("cache_hit", "direct", "/"),
        "cache_hit_over_off": median_of("cache_hit", "off", "/"),
        "load_average_1m_before": load_before,
        "load_average_1m_after": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aihub-bench-gov-") as work:
        results = measure(Path(work), args.rounds, args.seconds)
    for name, value in results.items():
        print(f"{name:30} {value:10.3f}")


if __name__ == "__main__":
    main()
