"""Processes for the benchmark: start them pinned to cores, find their children, read their CPU
time and memory from /proc (Linux), stop them. No psutil: nothing beyond the standard library."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def split_cores() -> tuple[set[int] | None, set[int] | None]:
    """(node cores, client cores): the node alone on the first core, the mock and the load
    generator on the others. None where there is only one core: nothing is pinned."""
    available = cores()
    if len(available) < 2:
        return None, None
    return {available[0]}, set(available[1:])


def spawn(
    command: Sequence[str],
    *,
    cpus: set[int] | None,
    log: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start `command` in its own process group, pinned to `cpus` (as `taskset -c` would:
    children and threads inherit the mask), output to `log`, in `cwd` if given."""

    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    with log.open("ab") as out:
        return subprocess.Popen(
            list(command),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            preexec_fn=pin,
            start_new_session=True,
        )


def stop(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM the process (and, if it lingers, SIGKILL its whole group: it was started in a
    group of its own, so this reaches only what it started)."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may hold spaces: split after the last `)`.
    return text[text.rindex(")") + 2 :].split()


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants, as /proc shows them now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of these processes (all their threads, live and exited), in seconds."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            # After the name: state(0) ppid(1) … utime(11) stime(12).
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def _status_kb(pid: int, field: str, path: str = "status") -> int:
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def rss_mb(pids: Sequence[int]) -> float:
    """Resident set size, summed (shared pages of several processes count once each)."""
    return sum(_status_kb(pid, "VmRSS") for pid in pids) / 1024


def pss_mb(pids: Sequence[int]) -> float:
    """Proportional set size, summed: shared pages split between the processes sharing them,
    the fair measure for several worker processes."""
    return sum(_status_kb(pid, "Pss", "smaps_rollup") for pid in pids) / 1024


def thread_cpu_ns(pids: Sequence[int]) -> dict[tuple[int, int], int]:
    """Nanoseconds on a CPU of every live thread of these processes, by (pid, thread id), from
    the scheduler's own accounting (/proc/…/schedstat): exact, where `utime`+`stime` are
    sampled in 10 ms ticks, too coarse for a process that uses 1% of a core."""
    found: dict[tuple[int, int], int] = {}
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    text = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text()
                    found[(pid, int(tid))] = int(text.split()[0])
    return found


class CpuMeter:
    """CPU time of a process tree between `start()` and `stop()`: the scheduler's nanoseconds
    per thread where /proc has them (a thread that ends in between loses its share; the
    node's threads live as long as it does), else the ticks of /proc/…/stat."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._pids: list[int] = []
        self._threads: dict[tuple[int, int], int] = {}
        self._before = 0.0
        self._started = 0.0

    def start(self) -> None:
        self._pids = tree(self.pid)
        self._threads = thread_cpu_ns(self._pids)
        self._before = cpu_seconds(self._pids)
        self._started = time.perf_counter()

    def stop(self) -> tuple[float, float]:
        """(CPU seconds used, wall seconds elapsed)."""
        wall = time.perf_counter() - self._started
        if not self._threads:
            return cpu_seconds(self._pids) - self._before, wall
        after = thread_cpu_ns(self._pids)
        used = sum(ns - self._threads.get(thread, 0) for thread, ns in after.items())
        return used / 1e9, wall
