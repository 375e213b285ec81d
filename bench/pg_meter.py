"""What a throughput run of the PostgreSQL arm cost each part of the machine, and what the
database did for it (`bench/postgres.py`).

- CPU: each node process, PostgreSQL (its backends, which run the node's statements, apart
  from its own helpers: WAL writer, checkpointer, autovacuum…), the mock upstream, the load
  generators, the bench itself, and what the rest of the machine (other people's work) took,
  from /proc: utime + stime before and after, and the whole machine's from /proc/stat.
- Statements: what PostgreSQL ran, per request, from `pg_stat_statements` (the server is
  started with it preloaded), reset before the run and read after.
- Waits: `pg_stat_activity` sampled during the run: how often a backend of the node waited on
  a lock (a hot row both processes update, an advisory lock) rather than ran or idled.
"""

from __future__ import annotations

import asyncio
import os
import resource
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench import procs
from bench.run import system_busy_seconds
from tests.postgres import PostgresServer

# The server's extra settings: pg_stat_statements loaded, every statement tracked.
SETTINGS = "-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=top"


def _ticks(pid: int) -> tuple[int, int, str]:
    """(nanoseconds on a CPU, by the scheduler's own accounting: exact where the ticks of
    /proc/…/stat are 10 ms samples of processes that run for tens of microseconds at a time;
    the waited-for children's utime + stime, in ticks; the command line) of a pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        ran = int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
        line = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0, 0, ""
    fields = text[text.rindex(")") + 2 :].split()
    return ran, int(fields[13]) + int(fields[14]), line


class PostgresMeter:
    """PostgreSQL's CPU between `start` and `stop`, split into the backends that serve
    clients and the server's own processes. Processes born during the run count whole; those
    born and gone in it (an autovacuum worker) count through the postmaster's children's time,
    as the server's own."""

    def __init__(self, postmaster: int) -> None:
        self.postmaster = postmaster
        self._before: dict[int, int] = {}
        self._reaped = 0

    def _snapshot(self) -> dict[int, tuple[int, str]]:
        return {
            pid: (ran, line)
            for pid in procs.tree(self.postmaster)
            for ran, _, line in [_ticks(pid)]
            if line
        }

    def start(self) -> None:
        self._before = {pid: ran for pid, (ran, _) in self._snapshot().items()}
        self._reaped = _ticks(self.postmaster)[1]

    def stop(self) -> tuple[float, float]:
        """(CPU seconds of the backends, of the server's own processes)."""
        backends = server = 0.0
        for pid, (ran, line) in self._snapshot().items():
            used = (ran - self._before.get(pid, 0)) / 1e9
            # A client's backend names its user: "postgres: aihub DB 127.0.0.1(port) idle".
            if line.startswith("postgres: aihub "):
                backends += used
            else:
                server += used
        server += (_ticks(self.postmaster)[1] - self._reaped) / procs.CLOCK_TICKS
        return backends, server


def children_seconds() -> float:
    """CPU of this process's children that were waited for (the load generators)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Split:
    """CPU seconds of each part over one run, and the run's wall seconds."""

    wall: float
    nodes: list[float]
    backends: float
    server: float
    mock: float
    loadgen: float
    bench: float
    machine: float  # every core's busy time, everyone's

    @property
    def others(self) -> float:
        """What the machine was busy with that is none of the bench's processes."""
        ours = sum(self.nodes) + self.backends + self.server + self.mock
        return max(self.machine - ours - self.loadgen - self.bench, 0.0)

    def per_request(self, requests: float) -> dict[str, float]:
        """Microseconds of CPU per request of each part."""
        each = 1e6 / max(requests, 1)
        shares = {f"node_{i + 1}": used for i, used in enumerate(self.nodes)}
        shares |= {
            "postgres_backends": self.backends,
            "postgres_server": self.server,
            "mock": self.mock,
            "wrk": self.loadgen,
            "bench": self.bench,
            "others": self.others,
        }
        return {name: used * each for name, used in shares.items()}

    def cores(self) -> dict[str, float]:
        """Cores each part took on average (CPU seconds per second of the run)."""
        return {
            "nodes": sum(self.nodes) / self.wall,
            "postgres": (self.backends + self.server) / self.wall,
            "mock": self.mock / self.wall,
            "wrk": self.loadgen / self.wall,
            "others": self.others / self.wall,
        }


class CpuSplit:
    """Meters every part of the machine from `start` to `stop`."""

    def __init__(self, nodes: list[int], postmaster: int, mock: int) -> None:
        self._nodes = [procs.CpuMeter(pid) for pid in nodes]
        self._mock = procs.CpuMeter(mock)
        self._postgres = PostgresMeter(postmaster)
        self._marks: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def start(self) -> None:
        for meter in (*self._nodes, self._mock):
            meter.start()
        self._postgres.start()
        self._marks = (children_seconds(), self_seconds(), system_busy_seconds())

    def stop(self) -> Split:
        nodes = [meter.stop() for meter in self._nodes]
        mock = self._mock.stop()[0]
        backends, server = self._postgres.stop()
        children, me, machine = self._marks
        return Split(
            wall=nodes[0][1],
            nodes=[used for used, _ in nodes],
            backends=backends,
            server=server,
            mock=mock,
            loadgen=children_seconds() - children,
            bench=self_seconds() - me,
            machine=system_busy_seconds() - machine,
        )


# --- statements ----------------------------------------------------------------------------


@dataclass
class Statement:
    calls: int
    exec_ms: float
    query: str


def enable_statements(server: PostgresServer, database: str) -> None:
    server.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements", database)


def reset_statements(server: PostgresServer, database: str) -> None:
    server.psql("SELECT pg_stat_statements_reset()", database)


def read_statements(server: PostgresServer, database: str) -> list[Statement]:
    """The node's statements since the reset (the bench's own psql's left out), most called
    first."""
    out = server.psql(
        "SELECT s.calls, s.total_exec_time, regexp_replace(s.query, '\\s+', ' ', 'g')"
        " FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid"
        f" WHERE d.datname = '{database}' AND s.query NOT LIKE '%pg_stat_statements%'"
        " ORDER BY s.calls DESC",
        database,
    )
    found = []
    for line in out.splitlines():
        calls, exec_ms, query = line.split("|", 2)
        found.append(Statement(int(calls), float(exec_ms), query))
    return found


# --- waits ---------------------------------------------------------------------------------


@dataclass
class Waits:
    """What the node's backends were doing, sampled: `active` running a statement, `locks`
    waiting on a lock (by wait event), `idle_in_transaction` between a transaction's
    statements (waiting on the node), over `samples` samples."""

    samples: int = 0
    active: int = 0
    idle_in_transaction: int = 0
    locks: Counter[str] = field(default_factory=Counter)


class WaitSampler:
    """Samples `pg_stat_activity` every `interval` seconds on a connection of its own, in a
    thread, until `stop`."""

    def __init__(self, server: PostgresServer, database: str, interval: float = 0.1) -> None:
        self._dsn = server.url(database)
        self._password = server.password
        self._interval = interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()))
        self.waits = Waits()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> Waits:
        self._done.set()
        self._thread.join()
        return self.waits

    async def _run(self) -> None:
        import asyncpg

        db = await asyncpg.connect(self._dsn, password=self._password)
        try:
            while not self._done.is_set():
                rows = await db.fetch(
                    "SELECT state, wait_event_type, wait_event FROM pg_stat_activity"
                    " WHERE application_name = 'aihub' AND pid != pg_backend_pid()"
                )
                self.waits.samples += 1
                for state, kind, event in rows:
                    if kind == "Lock":
                        self.waits.locks[event] += 1
                    elif state == "active":
                        self.waits.active += 1
                    elif state == "idle in transaction":
                        self.waits.idle_in_transaction += 1
                await asyncio.sleep(self._interval)
        finally:
            await db.close()


def load_average() -> float:
    return os.getloadavg()[0]
