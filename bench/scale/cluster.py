"""The nodes of a scale run: made with the provisioning code (`create_node`), configured with
the run's intervals, started as `aihub serve` processes, joined by invites in a topology.

What the three-node demo already has is reused (`node.demo`: a node's folder and files, the
in-process CLI runner, starting and stopping processes); what is added is many nodes, the
topologies and the counting relay in front of them (`bench/scale/relay.py`)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from node.cli.main import main as cli_main
from node.config import CONFIG_FILE, parse_config
from node.demo.network import aihub_command, in_process
from node.demo.nodes import NetworkError, Node
from node.demo.processes import kill_group, ready
from node.provision import create_node

MODEL = "scale-echo"
READY_TIMEOUT = 60.0
# The relay's ports are the node's port plus this: peers know a node by its relay port.
INTERNAL_OFFSET = 1000


@dataclass(frozen=True)
class Intervals:
    """The federation's intervals for the run (seconds); the table names them."""

    health: int
    reconcile: int

    def toml(self) -> dict[str, str]:
        return {
            "health_interval = 30": f"health_interval = {self.health}",
            "reconcile_interval = 3600": f"reconcile_interval = {self.reconcile}",
        }


def model_toml(price_in: int, price_out: int, name: str = MODEL) -> str:
    return (
        f'\n[[models]]\nname = "{name}"\nprovider = "echo"\n'
        f"price_in = {price_in}\nprice_out = {price_out}\n"
    )


def joins_for(topology: str, count: int, seed: int) -> list[tuple[int, int]]:
    """(joiner, issuer) pairs: the joiner may use the issuer's models. Node 0 is the
    provider every measurement watches; node 1 serves the same model dearer (the fallback
    when node 0 dies), and the consumers that route around it join node 1 as well."""
    if topology == "star":
        pairs = [(i, 0) for i in range(1, count)]
    elif topology == "chain":
        pairs = [(i, i - 1) for i in range(1, count)]
    elif topology == "random":
        rng = random.Random(seed)
        pairs = []
        for joiner in range(1, count):
            others = [i for i in range(count) if i != joiner]
            chosen = set(rng.sample(others, min(len(others), rng.randint(3, 5))))
            chosen.add(0)  # every node can reach the provider under test
            pairs += [(joiner, issuer) for issuer in sorted(chosen)]
    else:
        raise ValueError(f"unknown topology {topology!r}")
    return pairs


@dataclass
class Cluster:
    root: Path
    count: int
    base_port: int
    intervals: Intervals
    nodes: list[Node] = field(default_factory=list)
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    relay: subprocess.Popen[bytes] | None = None
    keys: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cli = in_process(cli_main)
        self.nodes = [
            Node(f"n{i:02d}", self.root / f"n{i:02d}", self.base_port + INTERNAL_OFFSET + i)
            for i in range(self.count)
        ]

    @property
    def counts_file(self) -> Path:
        return self.root / "relay.json"

    def public_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.base_port + index}"

    # -- making and starting --

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for index, node in enumerate(self.nodes):
            _, key = create_node(node.path, node.name)
            self.keys[index] = key
            extra = model_toml(1_000_000, 2_000_000) if index == 0 else ""
            extra += model_toml(5_000_000, 9_000_000) if index == 1 else ""
            self.configure(index, extra)

    def configure(self, index: int, extra: str) -> None:
        node = self.nodes[index]
        config = node.path / CONFIG_FILE
        text = config.read_text()
        changes = {
            "port = 8787\n": f"port = {node.port}\n",
            "public_urls = []": f'public_urls = ["{self.public_url(index)}"]',
            "json = false": "json = true",
            **self.intervals.toml(),
        }
        for old, new in changes.items():
            if old not in text:
                raise NetworkError(f"{config}: the template has no {old!r} to set")
            text = text.replace(old, new, 1)
        text += extra
        parse_config(text.encode(), str(config))
        config.write_text(text)

    def set_models(self, index: int, extra: str) -> None:
        """Replace what this harness appended to a node's config (its scale models)."""
        config = self.nodes[index].path / CONFIG_FILE
        text = config.read_text()
        head = text.split('\n[[models]]\nname = "' + MODEL, 1)[0]
        text = head.rstrip("\n") + "\n" + extra
        parse_config(text.encode(), str(config))
        config.write_text(text)

    def start_relay(self) -> None:
        pairs = [f"{self.base_port + i}:{node.port}" for i, node in enumerate(self.nodes)]
        self.relay = subprocess.Popen(
            [sys.executable, "-m", "bench.scale.relay", str(self.counts_file), *pairs],
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self.counts_file.exists():
            if time.monotonic() > deadline or self.relay.poll() is not None:
                raise NetworkError("the counting relay did not start")
            time.sleep(0.05)

    def start(self, indexes: list[int] | None = None) -> None:
        chosen = range(self.count) if indexes is None else indexes
        for index in chosen:
            node = self.nodes[index]
            with node.log_file.open("ab") as log:
                # One worker per node (the default is one per core): N nodes share the machine.
                self.processes[index] = subprocess.Popen(
                    [*aihub_command(), "serve", "--workers", "1", *node.data_dir_args()],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    cwd=node.path,
                )
        for index in chosen:
            self.wait_ready(index)

    def wait_ready(self, index: int) -> None:
        node, process = self.nodes[index], self.processes[index]
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready(node):
            if process.poll() is not None:
                tail = node.log_file.read_text(errors="replace").splitlines()[-5:]
                raise NetworkError(f"{node.name} exited ({node.log_file}):\n" + "\n".join(tail))
            if time.monotonic() > deadline:
                raise NetworkError(f"{node.name} not ready after {READY_TIMEOUT:g} s")
            time.sleep(0.1)

    def kill(self, index: int) -> None:
        process = self.processes.pop(index, None)
        if process is not None:
            kill_group(process.pid)
            process.wait()

    def stop_one(self, index: int) -> None:
        """SIGTERM, and SIGKILL if it has not stopped within 10 s."""
        process = self.processes.pop(index, None)
        if process is None:
            return
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            kill_group(process.pid)
            process.wait()

    def stop(self) -> None:
        for index in list(self.processes):
            self.stop_one(index)
        if self.relay is not None:
            self.relay.terminate()
            self.relay.wait()
            self.relay = None

    def pid(self, index: int) -> int:
        return self.processes[index].pid

    # -- joining --

    def join(self, joiner: int, issuer: int) -> None:
        token = self.cli(["invite", "create", *self.nodes[issuer].data_dir_args()]).strip()
        self.cli(["join", token, *self.nodes[joiner].data_dir_args()])

    def relay_counts(self) -> dict[int, list[int]]:
        """Bytes to and from each node (by index) and connections, as the relay counted."""
        raw = json.loads(self.counts_file.read_text())
        return {int(port) - self.base_port: value for port, value in raw.items()}

    def access_lines(self, index: int) -> list[dict[str, object]]:
        """The node's access-log entries (JSON lines) for requests from peers."""
        entries = []
        for line in self.nodes[index].log_file.read_text(errors="replace").splitlines():
            if '"path"' not in line:
                continue
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
        return entries
