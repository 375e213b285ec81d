"""Where the hop's latency sits, from the packets on loopback: `tcpdump` timestamps every
request and answer as it crosses between the client, beta, alpha and the mock, so that each
process's share of a request is read off the wire without slowing any of them (a profiler
or `strace` in the node adds more than the steps it would time). The chain arm (the same two
nodes with no federation: `bench.hop_live`) beside the hop gives what the federation adds at
each one, sequential requests from httpx over keep-alive, nothing pinned:

    .venv/bin/python -m bench.hop_timeline [--seconds 2]      # needs tcpdump (and root)

Each segment is the median, over the requests, of the time from the last packet of one
crossing to the first of the next: the client's request reaching beta until beta's reaches
alpha is beta's work before the call, and so on round to beta's answer to the client.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
from dataclasses import asdict
from pathlib import Path

import httpx

from bench.hop_live import LiveHop
from bench.run import QUICK, Settings
from bench.unpinned import sequential

# The crossings a hop request makes, in order, and those of a request to one node.
HOP_MARKS = ("client > beta", "beta > alpha", "alpha > mock", "mock > alpha", "alpha > beta",
             "beta > client")  # fmt: skip
NODE_MARKS = ("client > alpha", "alpha > mock", "mock > alpha", "alpha > client")
# Each gap, named for whose work it holds.
HOP_GAPS = ("beta, before the call", "alpha, before the upstream call", "the mock",
            "alpha, after the answer", "beta, after the answer")  # fmt: skip
NODE_GAPS = ("alpha, before the upstream call", "the mock", "alpha, after the answer")
_PACKET = re.compile(r"(\d+\.\d+) IP [\d.]+\.(\d+) > [\d.]+\.(\d+): .* length (\d+)")


def crossings(pcap: str, ports: dict[str, int], client_to: str) -> list[tuple[float, str]]:
    """Each packet that carries data, as (time, "from > to"), the client's peer being the
    one node it asks (`client_to`)."""
    names = {str(port): name for name, port in ports.items()}
    out = subprocess.run(
        ["tcpdump", "-r", pcap, "-n", "-tt"], capture_output=True, text=True, check=True
    ).stdout
    found = []
    for line in out.splitlines():
        match = _PACKET.match(line)
        if match is None or match[4] == "0":
            continue
        source, destination = names.get(match[2]), names.get(match[3])
        if destination is not None and source is None:
            source = "client" if destination == client_to else _caller(destination)
        elif source is not None and destination is None:
            destination = "client" if source == client_to else _caller(source)
        if source and destination:
            found.append((float(match[1]), f"{source} > {destination}"))
    return found


def _caller(server: str) -> str:
    """Who opens connections to `server` here: alpha calls the mock, beta calls alpha."""
    return {"mock": "alpha", "alpha": "beta"}.get(server, "client")


def requests(found: list[tuple[float, str]], marks: tuple[str, ...]) -> list[list[float]]:
    """Per request, the first and last time of each crossing in `marks` (flattened pairs),
    for those that made every crossing once in order."""
    out, current = [], None
    for when, crossing in found:
        if crossing == marks[0] and (current is None or current[-1][1] == marks[-1]):
            if current:
                out.append(current)
            current = []
        if current is not None:
            current.append((when, crossing))
    whole = []
    for packets in out:
        times = []
        for mark in marks:
            at = [when for when, crossing in packets if crossing == mark]
            if not at:
                break
            times += [at[0], at[-1]]
        else:
            whole.append(times)
    return whole


def gaps(times: list[list[float]], names: tuple[str, ...]) -> dict[str, float]:
    """The median of each gap (last packet of one crossing to the first of the next) and of
    the whole, in µs."""
    figures = {}
    for n, name in enumerate(names):
        figures[name] = statistics.median((t[2 * n + 2] - t[2 * n + 1]) * 1e6 for t in times)
    figures["whole, first packet in to last out"] = statistics.median(
        (t[-1] - t[0]) * 1e6 for t in times
    )
    return figures


def record(bench: LiveHop, arm: str, seconds: float, work: Path) -> str:
    """`seconds` of sequential requests to `arm`, captured."""
    pcap = str(work / f"{arm}.pcap")
    ports = (bench.b.port, bench.a.port, bench.mock_port)
    rule = " or ".join(f"tcp port {port}" for port in ports)
    with httpx.Client(timeout=30) as client:
        sequential(client, bench.targets[arm], 0.5)  # connect and warm
        dump = subprocess.Popen(
            [
                "tcpdump",
                "-i",
                "lo",
                "-n",
                "-s",
                "128",
                "-U",
                "--immediate-mode",
                "-w",
                pcap,
                rule,
            ],
            stderr=subprocess.PIPE,
        )
        assert dump.stderr is not None
        dump.stderr.readline()  # "listening on lo ...": capturing from here
        sequential(client, bench.targets[arm], seconds)
    dump.terminate()  # -U: each packet is in the file once captured
    dump.wait(10)
    return pcap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    if shutil.which("tcpdump") is None:
        raise SystemExit("needs tcpdump: apt-get install tcpdump")
    os.chdir(Path(__file__).parent.parent)
    bench = LiveHop(Settings(**asdict(QUICK)), Path(os.devnull), keep=False)
    try:
        bench.setup()
        ports = {"beta": bench.b.port, "alpha": bench.a.port, "mock": bench.mock_port}
        figures: dict[str, dict[str, float]] = {}
        counts: dict[str, int] = {}
        for arm in ("node", "chain", "hop"):
            pcap = record(bench, arm, args.seconds, bench.work)
            client_to = "alpha" if arm == "node" else "beta"
            marks, names = (NODE_MARKS, NODE_GAPS) if arm == "node" else (HOP_MARKS, HOP_GAPS)
            times = requests(crossings(pcap, ports, client_to), marks)
            counts[arm] = len(times)
            figures[arm] = gaps(times, names)
    finally:
        bench.close()
    print(f"medians in µs (requests: {counts}; load {os.getloadavg()[0]:.2f})")
    print(f"  {'':36} {'node':>8} {'chain':>8} {'hop':>8} {'hop - chain':>12}")
    for name in (*HOP_GAPS, "whole, first packet in to last out"):
        node, chain, hop = (figures[arm].get(name) for arm in ("node", "chain", "hop"))
        assert chain is not None and hop is not None
        shown = f"{node:8.0f}" if node is not None else " " * 8
        print(f"  {name:36} {shown} {chain:8.0f} {hop:8.0f} {hop - chain:12.0f}")


if __name__ == "__main__":
    main()
