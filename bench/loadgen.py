"""Load generators: `wrk` (compiled, preferred) and a raw-socket Python one on uvloop, used for
the fixed-rate CPU runs and wherever wrk is missing; and a blocking streaming client that
times every SSE event.

Run as a module, the Python generator prints one JSON line:

    python -m bench.loadgen --host 127.0.0.1 --port 9000 --path /v1/chat/completions \
        --body-file body.json [--header 'authorization: Bearer …'] --connections 8 \
        --duration 3 [--rate 300]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Target:
    """One arm's endpoint: where to send what."""

    name: str
    host: str
    port: int
    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def request(self, body: bytes | None = None) -> bytes:
        body = self.body if body is None else body
        lines = [
            f"POST {self.path} HTTP/1.1",
            f"host: {self.host}:{self.port}",
            "content-type: application/json",
            *(f"{name}: {value}" for name, value in self.headers.items()),
            f"content-length: {len(body)}",
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"


@dataclass
class Run:
    """What one load run measured."""

    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    tool: str

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not values:
        return math.nan
    rank = max(0, min(len(values) - 1, math.ceil(fraction * len(values)) - 1))
    return values[rank]


# --- wrk ------------------------------------------------------------------------------------

WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"mean_us":%f,"p50_us":%d,"p90_us":%d,"p99_us":%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_version() -> str | None:
    path = wrk_path()
    if path is None:
        return None
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    match = re.search(r"wrk (\S+)", out.stdout + out.stderr)
    return match.group(1) if match else "unknown"


def _lua_string(text: str) -> str:
    level = "=" * 4
    assert f"]{level}]" not in text
    return f"[{level}[{text}]{level}]"


def run_wrk(
    target: Target, connections: int, duration: float, cpus: set[int] | None, workdir: Path
) -> Run:
    """`wrk -t1 -cN -dS` against `target`; one thread is plenty at these rates."""
    script = workdir / f"wrk-{target.name}.lua"
    lines = [
        'wrk.method = "POST"',
        f"wrk.body = {_lua_string(target.body.decode())}",
        'wrk.headers["Content-Type"] = "application/json"',
        *(
            f"wrk.headers[ {_lua_string(name)} ] = {_lua_string(value)}"
            for name, value in target.headers.items()
        ),
        WRK_DONE,
    ]
    script.write_text("\n".join(lines))
    command = [
        wrk_path() or "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        target.url,
    ]
    out = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=(lambda: _pin(cpus)),
    )
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCHJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {out.stdout[-500:]} {out.stderr[-500:]}")
    data = json.loads(line.removeprefix("BENCHJSON "))
    errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
    return Run(
        requests=data["requests"],
        errors=errors,
        seconds=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        mean_ms=data["mean_us"] / 1000,
        tool="wrk",
    )


def _pin(cpus: set[int] | None) -> None:
    import os

    if cpus:
        os.sched_setaffinity(0, cpus)


# --- the Python generator -------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        status = complete_response(self.buffer)
        if status is not None and self.waiter is not None and not self.waiter.done():
            self.buffer.clear()
            self.waiter.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(0)

    async def exchange(self, request: bytes) -> int:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter


def complete_response(buffer: bytearray | bytes) -> int | None:
    """The status of a complete HTTP/1.1 response in `buffer`, or None while incomplete."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buffer[:end]).lower()
    status = int(head[9:12])
    at = head.find(b"\r\ncontent-length:")
    if at >= 0:
        line_end = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : line_end if line_end >= 0 else None])
        return status if len(buffer) >= end + 4 + length else None
    if b"transfer-encoding: chunked" in head:
        return status if buffer.endswith(b"0\r\n\r\n") else None
    return status


async def generate(
    host: str,
    port: int,
    request: bytes,
    connections: int,
    duration: float,
    rate: float | None,
) -> dict[str, object]:
    """Closed loop (each connection sends its next request when the last is answered), or, with
    `rate`, an open schedule of `rate` requests/s spread over the connections."""
    loop = asyncio.get_running_loop()
    conns = []
    for _ in range(connections):
        _, conn = await loop.create_connection(_Connection, host, port)
        conns.append(conn)
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    deadline = start + duration

    async def worker(index: int, conn: _Connection) -> None:
        nonlocal errors
        sent = 0
        while True:
            now = time.perf_counter()
            if rate:
                due = start + (index + sent * connections) / rate
                if due >= deadline:
                    return
                if due > now:
                    await asyncio.sleep(due - now)
            elif now >= deadline:
                return
            # At a fixed rate, latency counts from when the request was due, not from when a
            # late connection got round to sending it (no coordinated omission, as wrk2).
            begun = due if rate else time.perf_counter()
            status = await conn.exchange(request)
            latencies.append((time.perf_counter() - begun) * 1000)
            sent += 1
            if status != 200:
                errors += 1
                if status == 0:
                    return

    await asyncio.gather(*(worker(i, c) for i, c in enumerate(conns)))
    elapsed = time.perf_counter() - start
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    return {"requests": len(latencies), "errors": errors, "seconds": elapsed, "ms": latencies}


def run_python(
    target: Target,
    connections: int,
    duration: float,
    cpus: set[int] | None,
    *,
    rate: float | None = None,
    processes: int = 1,
) -> Run:
    """The Python generator in `processes` processes (connections and rate split between them)."""
    import sys

    with tempfile.NamedTemporaryFile("wb", suffix=".json", delete=False) as file:
        file.write(target.body)
        body_file = file.name
    processes = max(1, min(processes, connections))
    running = []
    for index in range(processes):
        share = connections // processes + (1 if index < connections % processes else 0)
        command = [
            sys.executable,
            "-m",
            "bench.loadgen",
            "--host",
            target.host,
            "--port",
            str(target.port),
            "--path",
            target.path,
            "--body-file",
            body_file,
            "--connections",
            str(share),
            "--duration",
            str(duration),
            # A file, not the pipe: a result over 64 KiB (a latency per request) came back cut
            # at 65,536 bytes through stdout, the pipe's size, once the loop was done with it.
            "--out",
            f"{body_file}.{index}.out",
        ]
        for name, value in target.headers.items():
            command += ["--header", f"{name}: {value}"]
        if rate:
            command += ["--rate", str(rate * share / connections)]
        running.append(
            subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                cwd=Path(__file__).resolve().parent.parent,
                preexec_fn=(lambda: _pin(cpus)),
            )
        )
    latencies: list[float] = []
    requests = errors = 0
    seconds = 0.0
    for index, process in enumerate(running):
        out, _ = process.communicate(timeout=duration + 60)
        if process.returncode:
            raise RuntimeError(f"the load generator exited {process.returncode}: {out[-300:]!r}")
        result = Path(f"{body_file}.{index}.out")
        data = json.loads(result.read_text())
        result.unlink()
        requests += data["requests"]
        errors += data["errors"]
        seconds = max(seconds, data["seconds"])
        latencies.extend(data["ms"])
    Path(body_file).unlink(missing_ok=True)
    latencies.sort()
    return Run(
        requests=requests,
        errors=errors,
        seconds=seconds,
        p50_ms=percentile(latencies, 0.50),
        p90_ms=percentile(latencies, 0.90),
        p99_ms=percentile(latencies, 0.99),
        mean_ms=sum(latencies) / len(latencies) if latencies else math.nan,
        tool="python",
    )


# --- streaming ------------------------------------------------------------------------------


@dataclass
class StreamTiming:
    status: int
    first_byte_ms: float  # the response's first byte (status line)
    first_event_ms: float  # the first complete SSE event: what a user sees as the first token
    gaps_ms: list[float]  # between consecutive complete events
    events: int


class StreamClient:
    """A blocking keep-alive connection that sends streamed chat requests and times each SSE
    event as it completes. Blocking sockets and no event loop: the least jitter Python has."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def stream(self, request: bytes, timeout: float = 30.0) -> StreamTiming:
        self.sock.settimeout(timeout)
        buffer = bytearray()
        started = time.perf_counter()
        self.sock.sendall(request)
        first_byte = math.nan
        body_at = -1
        stamps: list[float] = []
        status = 0
        while True:
            data = self.sock.recv(65536)
            now = time.perf_counter()
            if not data:
                break
            if not buffer:
                first_byte = now
            buffer += data
            if body_at < 0:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    continue
                body_at = end + 4
                status = int(bytes(buffer[9:12]))
                if b"transfer-encoding: chunked" not in bytes(buffer[:end]).lower():
                    # An error answer with a length: read it whole, no events.
                    while complete_response(buffer) is None:
                        more = self.sock.recv(65536)
                        if not more:
                            break
                        buffer += more
                    break
            # Every SSE event ends with a blank line; each one completed now is stamped now.
            completed = bytes(buffer[body_at:]).count(b"\n\n")
            stamps.extend([now] * (completed - len(stamps)))
            if buffer.endswith(b"\r\n0\r\n\r\n"):
                break
        gaps = [(b - a) * 1000 for a, b in itertools.pairwise(stamps)]
        return StreamTiming(
            status=status,
            first_byte_ms=(first_byte - started) * 1000,
            first_event_ms=(stamps[0] - started) * 1000 if stamps else math.nan,
            gaps_ms=gaps,
            events=len(stamps),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description="The benchmark's Python load generator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--body-file", required=True)
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--rate", type=float, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here, not stdout")
    args = parser.parse_args()
    headers = dict(h.split(": ", 1) for h in args.header)
    target = Target("cli", args.host, args.port, args.path, Path(args.body_file).read_bytes())
    target.headers = headers
    coroutine = generate(
        args.host, args.port, target.request(), args.connections, args.duration, args.rate
    )
    try:
        import uvloop

        result = uvloop.run(coroutine)
    except ImportError:
        result = asyncio.run(coroutine)
    if args.out:
        args.out.write_text(json.dumps(result))
    else:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
