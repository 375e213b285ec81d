"""Where the cores go during a load run: the CPU time and context switches of each process the
run involves (every thread of it, the event loop's apart from the rest: the store's aiosqlite
thread, executors), of the load generator, and of the whole machine (busy, idle, stolen by the
hypervisor), so that a throughput figure can be split into what the node itself spent per
request and what its neighbours took. Linux /proc only; nothing beyond the standard library.

Threads are read from /proc/PID/task/TID/schedstat (the scheduler's nanoseconds on a CPU) and
/proc/PID/task/TID/status (voluntary and involuntary context switches); a thread that ends in
between loses its share (the node's threads live as long as it does). The load generator is a
child the caller waits for: its figures are the difference of `getrusage(RUSAGE_CHILDREN)`.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import procs


@dataclass
class Thread:
    ns: int = 0
    voluntary: int = 0
    involuntary: int = 0


@dataclass
class Usage:
    """One group of processes over a run, per request served."""

    cpu_us: float  # all threads
    loop_us: float  # the main threads (each process's event loop)
    other_us: float  # every other thread (the store's, executors)
    threads: int
    voluntary: float  # context switches per request: the thread waited (I/O, a lock, a hop)
    involuntary: float  # ... the scheduler took the core away (a neighbour wanted it)

    def line(self) -> str:
        return (
            f"{self.cpu_us:,.0f} us/req (loop {self.loop_us:,.0f}, other threads "
            f"{self.other_us:,.0f}; {self.threads} threads), switches/req "
            f"{self.voluntary:.2f} voluntary {self.involuntary:.2f} involuntary"
        )


@dataclass
class Split:
    """What one load run cost: each group's Usage, the load generator's, the machine's."""

    requests: int
    seconds: float
    groups: dict[str, Usage] = field(default_factory=dict)
    busy_cores: float = 0.0  # the whole machine, every process
    idle_cores: float = 0.0
    steal_cores: float = 0.0  # taken by the hypervisor for other guests

    def unaccounted_us(self) -> float:
        """Busy CPU per request that none of the groups spent (other programs, the kernel's
        softirqs outside any of them, the benchmark itself)."""
        busy = self.busy_cores * self.seconds * 1e6 / max(self.requests, 1)
        return busy - sum(u.cpu_us for u in self.groups.values())

    def as_dict(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "busy_cores": round(self.busy_cores, 3),
            "idle_cores": round(self.idle_cores, 3),
            "steal_cores": round(self.steal_cores, 3),
            "unaccounted_us_per_req": round(self.unaccounted_us(), 1),
            "groups": {
                name: {k: round(v, 2) for k, v in vars(u).items()}
                for name, u in self.groups.items()
            },
        }


def place(roots: Sequence[int], cpus: set[int]) -> None:
    """Move every thread of these processes and their descendants onto `cpus` (what `taskset
    -a -p` does; a process's mask alone would leave its running threads where they are)."""
    for pid in (p for root in roots for p in procs.tree(root)):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.sched_setaffinity(int(tid), cpus)


def _threads(pids: Sequence[int]) -> dict[tuple[int, int], Thread]:
    found: dict[tuple[int, int], Thread] = {}
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    task = f"/proc/{pid}/task/{tid}"
                    ns = int(Path(f"{task}/schedstat").read_text().split()[0])
                    status = Path(f"{task}/status").read_text()
                    found[(pid, int(tid))] = Thread(
                        ns,
                        _field(status, "voluntary_ctxt_switches"),
                        _field(status, "nonvoluntary_ctxt_switches"),
                    )
    return found


def _field(status: str, name: str) -> int:
    for line in status.splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


def _machine() -> list[int]:
    """The first line of /proc/stat: user nice system idle iowait irq softirq steal (ticks)."""
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


def _children() -> tuple[float, int, int]:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime, used.ru_nvcsw, used.ru_nivcsw


class Meter:
    """`with meter.run() as split:` around a load run over `groups` (name: root pids, whose
    descendants count too); fill `split.requests` inside, the rest is
    filled on the way out (`seconds` is the meter's own wall time). The generator, if the
    caller waits for it inside, is "loadgen"."""

    def __init__(self, groups: Mapping[str, Sequence[int]]) -> None:
        self.groups = {name: list(pids) for name, pids in groups.items()}

    @contextlib.contextmanager
    def run(self) -> Iterator[Split]:
        trees = {
            name: [p for root in roots for p in procs.tree(root)]
            for name, roots in self.groups.items()
        }
        before = {name: _threads(pids) for name, pids in trees.items()}
        machine, children = _machine(), _children()
        split = Split(0, 0.0)
        started = time.perf_counter()
        yield split
        split.seconds = time.perf_counter() - started
        after = {name: _threads(pids) for name, pids in trees.items()}
        machine_after, children_after = _machine(), _children()
        n = max(split.requests, 1)
        for name in trees:
            split.groups[name] = _usage(before[name], after[name], n)
        cpu, vcs, ivcs = (b - a for a, b in zip(children, children_after, strict=True))
        split.groups["loadgen"] = Usage(cpu * 1e6 / n, cpu * 1e6 / n, 0.0, 1, vcs / n, ivcs / n)
        ticks = [b - a for a, b in zip(machine, machine_after, strict=True)]
        seconds = split.seconds * procs.CLOCK_TICKS
        user, nice, system, idle, iowait, irq, softirq, steal = ticks
        split.busy_cores = (user + nice + system + irq + softirq) / seconds
        split.idle_cores = (idle + iowait) / seconds
        split.steal_cores = steal / seconds


def _usage(before: dict[tuple[int, int], Thread], after: dict[tuple[int, int], Thread], n: int):
    loop = other = 0
    vcs = ivcs = 0
    for key, now in after.items():
        then = before.get(key, Thread())
        spent = now.ns - then.ns
        if key[0] == key[1]:
            loop += spent
        else:
            other += spent
        vcs += now.voluntary - then.voluntary
        ivcs += now.involuntary - then.involuntary
    return Usage(
        (loop + other) / 1e3 / n,
        loop / 1e3 / n,
        other / 1e3 / n,
        len(after),
        vcs / n,
        ivcs / n,
    )
