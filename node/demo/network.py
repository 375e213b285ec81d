"""`aihub network up` / `down`: three real nodes on loopback, peered by invites, with one request
routed across them, so that the whole path (invite, join, advert, signed peer request, receipt,
countersignature, balances) can be seen working on one machine.

The nodes are ordinary `aihub serve` processes, each with its own data folder under the network
folder (default `./.aihub-network`): `alice`, `bob` and `carol`, on three consecutive ports. Bob
and carol join alice by invite and alice joins carol, so carol can use alice's models. Alice
alone serves `alice-echo` (the echo demo provider, with a price), and a request to carol for it
is served by alice: carol pays, and both keep the same countersigned receipt.

Peering and the books go through the real commands (`aihub invite create`, `aihub join`,
`aihub ledger export`, `aihub ledger balance`, `aihub usage`), run in this process: what is
shown is what an operator would type. `up` is idempotent: it reuses the folders, starts only the
nodes that are not running and joins only the pairs that are not yet joined; each `up` sends one
request and reports it. `down` stops the processes (SIGTERM, then SIGKILL) and keeps the data.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import click
import httpx
import msgspec

from node.config import CONFIG_FILE, DATABASE_FILE, IDENTITY_FILE, load_config, parse_config
from node.demo import DEFAULT_BASE_PORT as DEFAULT_BASE_PORT
from node.demo import DEFAULT_DIR as DEFAULT_DIR
from node.demo.nodes import NetworkError, Node
from node.demo.processes import alive, kill_group, listening, ready, serves, wait_gone
from node.demo.report import JoinState, NodeState, Report, Served, Stopped
from node.provision import create_node, node_exists
from node.storage import opened

NODES = ("alice", "bob", "carol")
# (joiner, issuer): bob and carol join alice by invite; alice joins carol.
JOINS = (("bob", "alice"), ("carol", "alice"), ("alice", "carol"))
PROVIDER, CONSUMER = "alice", "carol"
DEMO_MODEL = "alice-echo"
DEMO_PROMPT = "Hello from carol's user"
DEMO_MODEL_TOML = f"""
# Added by `aihub network up`: a model only alice serves (the echo demo provider, priced), so
# that a request for it at another node is served by alice through the federation.
[[models]]
name = "{DEMO_MODEL}"
provider = "echo"
price_in = 1_000_000
price_out = 2_000_000
"""
HEALTH_INTERVAL = 2
READY_TIMEOUT = 30.0
SETTLE_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

Say = Callable[[str], None]
CommandRunner = Callable[[list[str]], str]


def in_process(main: click.Group) -> CommandRunner:
    """Run `aihub ARGS…` in this process (the same code as the shell command, without the
    interpreter's start-up time); answer what it printed, or raise NetworkError with its
    error message."""

    def run(args: list[str]) -> str:
        out, err = io.StringIO(), io.StringIO()
        code: Any = 0
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main.main(args, prog_name="aihub", standalone_mode=False)
            except SystemExit as exc:
                code = exc.code
            except click.ClickException as exc:
                code, message = 1, exc.format_message()
                err.write(message)
        if code not in (0, None):
            shown = " ".join(arg if len(arg) < 60 else arg[:20] + "…" for arg in args)
            detail = (err.getvalue() or out.getvalue()).strip()
            raise NetworkError(f"`aihub {shown}` failed: {detail}")
        return out.getvalue()

    return run


def aihub_command() -> list[str]:
    """How to start the `aihub` of this installation as a separate process."""
    script = Path(sys.executable).parent / "aihub"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "node.cli"]


# --- the network ------------------------------------------------------------------------------


class Network:
    def __init__(
        self, root: Path, base_port: int, cli: CommandRunner, say: Say, aihub: str = "aihub"
    ) -> None:
        """`aihub`: how the commands it shows are to be typed in this shell."""
        self.root = root.expanduser().absolute()
        self.aihub = aihub
        self.base_port = base_port
        self.cli = cli
        self.say = say
        self.nodes = [
            Node(name, self.root / name, self._port_of(name, base_port + index))
            for index, name in enumerate(NODES)
        ]
        self.by_name = {node.name: node for node in self.nodes}

    def _port_of(self, name: str, default: int) -> int:
        """An existing node keeps its port (its peers know it by its URL)."""
        path = self.root / name
        if (path / CONFIG_FILE).exists():
            try:
                return load_config(path).server.port
            except Exception as exc:
                raise NetworkError(str(exc)) from exc
        return default

    # -- up --

    def up(self) -> Report:
        self.root.mkdir(parents=True, exist_ok=True)
        existing = [node for node in self.nodes if node_exists(node.path)]
        if existing and existing[0].port != self.base_port:
            self.say(
                f"Reusing the network in {self.root} on ports {existing[0].port}-"
                f"{existing[0].port + len(NODES) - 1} (its nodes' peers know those URLs)."
            )
        created = {node.name for node in self.nodes if self._create(node)}
        started = self._start_all()
        states = [
            NodeState(
                node.name,
                node.url,
                node.node_id(),
                str(node.path),
                self._pid(node) or 0,
                (
                    "created and started"
                    if node.name in created
                    else "started"
                    if node.name in started
                    else "already running"
                ),
            )
            for node in self.nodes
        ]
        joins = [self._join(self.by_name[j], self.by_name[i]) for j, i in JOINS]
        return self._demonstrate(states, joins)

    def _create(self, node: Node) -> bool:
        if node_exists(node.path):
            if not all((node.path / name).exists() for name in (CONFIG_FILE, IDENTITY_FILE)):
                raise NetworkError(f"{node.path} holds a half-made node: remove it and run again")
            return False
        self.say(f"Creating {node.name} in {node.path} (port {node.port})")
        _, key = create_node(node.path, node.name)
        node.key_file.write_text(key + "\n")
        node.key_file.chmod(0o600)
        config = node.path / CONFIG_FILE
        text = config.read_text()
        for old, new in (
            ("port = 8787\n", f"port = {node.port}\n"),
            ("public_urls = []", f'public_urls = ["{node.url}"]'),
            ("health_interval = 30", f"health_interval = {HEALTH_INTERVAL}"),
        ):
            if old not in text:
                raise NetworkError(f"{config}: the template has no {old.strip()!r} to set")
            text = text.replace(old, new, 1)
        if node.name == PROVIDER:
            text += DEMO_MODEL_TOML
        parse_config(text.encode(), str(config))
        config.write_text(text)
        return True

    def _pid(self, node: Node) -> int | None:
        """The pid of this node's running `aihub serve`, from its pid file; None if it is not
        running (a pid file left by a process that is gone, or now names another process,
        does not count)."""
        try:
            pid = int(node.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if not alive(pid) or not serves(pid, node.path):
            return None
        return pid

    def _start_all(self) -> set[str]:
        """Start every node that is not running, all at once; wait until each is ready."""
        stopped = [node for node in self.nodes if self._pid(node) is None]
        for node in stopped:
            if listening(node):
                raise NetworkError(
                    f"port {node.port} is taken by something that is not this network's "
                    f"{node.name}: stop it, or use another --data-dir / --base-port"
                )
        starting: dict[str, subprocess.Popen[bytes]] = {}
        for node in stopped:
            self.say(f"Starting {node.name} at {node.url} (log: {node.log_file})")
            with node.log_file.open("ab") as log:
                # One worker each: three demo nodes share one machine (the default is a worker
                # per core, for a node that has the machine to itself).
                process = subprocess.Popen(
                    [*aihub_command(), "serve", "--workers", "1", *node.data_dir_args()],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own session: outlives this command and a Ctrl-C
                    cwd=node.path,
                )
            node.pid_file.write_text(f"{process.pid}\n")
            starting[node.name] = process
        for name, process in starting.items():
            self._wait_ready(self.by_name[name], process)
        for node in self.nodes:
            if node.name not in starting and not ready(node):
                self._wait_ready(node, None)
        return set(starting)

    def _wait_ready(self, node: Node, process: subprocess.Popen[bytes] | None) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                node.pid_file.unlink(missing_ok=True)
                raise NetworkError(
                    f"{node.name} exited with status {process.returncode}:\n" + _tail(node.log_file)
                )
            if ready(node):
                return
            time.sleep(0.1)
        raise NetworkError(
            f"{node.name} is not ready at {node.url} after {READY_TIMEOUT:g} s (`{self.aihub} "
            f"network down --data-dir {_short(self.root)}` stops what is running):\n"
            + _tail(node.log_file)
        )

    def _join(self, joiner: Node, issuer: Node) -> JoinState:
        if asyncio.run(_holds_key_from(joiner, issuer.node_id())):
            return JoinState(joiner.name, issuer.name, "already joined")
        self.say(f"$ {self.aihub} invite create --data-dir {_short(issuer.path)}")
        token = self.cli(["invite", "create", *issuer.data_dir_args()]).strip()
        self.say(f"$ {self.aihub} join {token[:16]}… --data-dir {_short(joiner.path)}")
        self.say("  " + " ".join(self.cli(["join", token, *joiner.data_dir_args()]).split()))
        return JoinState(joiner.name, issuer.name, "joined")

    # -- the request and what it left behind --

    def _demonstrate(self, states: list[NodeState], joins: list[JoinState]) -> Report:
        provider, consumer = self.by_name[PROVIDER], self.by_name[CONSUMER]
        key = consumer.admin_key()
        headers = {"authorization": f"Bearer {key}"}
        with httpx.Client(base_url=consumer.url, headers=headers, timeout=30) as client:
            owner = self._wait_for_model(client, consumer)
            self.say(
                f"Asking {consumer.name} ({consumer.url}) for {DEMO_MODEL}, with "
                f"{consumer.name}'s admin key from {consumer.key_file}"
            )
            body = {"model": DEMO_MODEL, "messages": [{"role": "user", "content": DEMO_PROMPT}]}
            response = client.post("/v1/chat/completions", json=body)
        if response.status_code != 200:
            raise NetworkError(
                f"{consumer.name} answered {response.status_code}: {response.text[:500]}"
            )
        answer = response.json()
        request_id = response.headers["aihub-request-id"]
        receipts = self._wait_countersigned(request_id, provider, consumer)
        ids = {node.node_id(): node.name for node in self.nodes}
        served = Served(
            status=response.status_code,
            model=DEMO_MODEL,
            asked=consumer.name,
            key_file=str(consumer.key_file),
            content=answer["choices"][0]["message"]["content"],
            request_id=request_id,
            cost_micros=int(response.headers.get("aihub-cost-micros", "0")),
            owner=owner,
            deployment=asyncio.run(_deployment_of(consumer, request_id)),
            provider_usage=self._usage_of_model(provider),
            consumer_usage=self._usage_of_model(consumer),
        )
        return Report(
            dir=str(self.root),
            provider=provider.name,
            consumer=consumer.name,
            nodes=states,
            joins=joins,
            request=served,
            receipt_provider=receipts[0],
            receipt_consumer=receipts[1],
            balance_provider=self._balance(provider, consumer),
            balance_consumer=self._balance(consumer, provider),
            names=ids,
        )

    def _wait_for_model(self, client: httpx.Client, consumer: Node) -> str:
        """Wait until the consumer lists the demo model (its advert arrives within a second or
        two of the join); answer the owner it names."""
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            response = client.get("/v1/models")
            if response.status_code == 200:
                for card in response.json()["data"]:
                    if card["id"] == DEMO_MODEL:
                        return str(card["owned_by"])
            if time.monotonic() > deadline:
                raise NetworkError(
                    f"{consumer.name} does not list {DEMO_MODEL} after {READY_TIMEOUT:g} s: is "
                    f"{PROVIDER} its peer? ({self.aihub} peers list --data-dir {consumer.path})"
                )
            time.sleep(0.1)

    def _export(self, node: Node) -> list[dict[str, Any]]:
        text = self.cli(["ledger", "export", "--format", "json", *node.data_dir_args()])
        return msgspec.json.decode(text or "[]")

    def _wait_countersigned(
        self, request_id: str, provider: Node, consumer: Node
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The request's receipt as each side exports it, once both hold it countersigned
        (the consumer sends countersignatures back in batches, every few seconds)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            found = []
            for node in (provider, consumer):
                mine = [r for r in self._export(node) if r.get("id") == request_id]
                found.append(mine[0] if mine else None)
            if all(r is not None and r.get("csig") for r in found):
                return found[0], found[1]  # type: ignore[return-value]
            if time.monotonic() > deadline:
                where = [n.name for n, r in zip((provider, consumer), found, strict=True) if not r]
                raise NetworkError(
                    f"the receipt of {request_id} is not countersigned on both sides after "
                    f"{SETTLE_TIMEOUT:g} s (missing at: {', '.join(where) or 'none'})"
                )
            time.sleep(0.25)

    def _balance(self, node: Node, other: Node) -> dict[str, Any]:
        rows = msgspec.json.decode(self.cli(["ledger", "balance", "--json", *node.data_dir_args()]))
        other_id = other.node_id()
        for row in rows:
            if row["peer"] == other_id:
                return dict(row)
        raise NetworkError(f"{node.name} has no balance with {other.name}")

    def _usage_of_model(self, node: Node) -> dict[str, Any]:
        text = self.cli(["usage", "--by", "model", "--json", *node.data_dir_args()])
        report = msgspec.json.decode(text)
        for row in report.get("data", []):
            if row.get("group") == DEMO_MODEL:
                return dict(row)
        return {}

    # -- down --

    def down(self) -> list[Stopped]:
        """SIGTERM every running node, wait, SIGKILL what is left; keep the data."""
        running: dict[str, int] = {}
        outcome: dict[str, Stopped] = {}
        for node in self.nodes:
            pid = self._pid(node)
            if pid is None:
                state = "stale pid file" if node.pid_file.exists() else "not running"
                node.pid_file.unlink(missing_ok=True)
                outcome[node.name] = Stopped(node.name, None, state)
                continue
            self.say(f"Stopping {node.name} (pid {pid})")
            os.kill(pid, signal.SIGTERM)
            running[node.name] = pid
        deadline = time.monotonic() + STOP_TIMEOUT
        while running and time.monotonic() < deadline:
            for name, pid in list(running.items()):
                if not alive(pid):
                    outcome[name] = Stopped(name, pid, "stopped")
                    del running[name]
            time.sleep(0.05)
        for name, pid in running.items():
            self.say(f"{name} (pid {pid}) did not stop within {STOP_TIMEOUT:g} s: SIGKILL")
            kill_group(pid)
            wait_gone(pid, 5.0)
            outcome[name] = Stopped(name, pid, "killed")
        for node in self.nodes:
            node.pid_file.unlink(missing_ok=True)
        return [outcome[node.name] for node in self.nodes]


# --- the node's own records -------------------------------------------------------------------


async def _holds_key_from(joiner: Node, issuer_id: str) -> bool:
    """Whether `joiner` has joined `issuer`: it holds an active key the issuer gave it. (Each
    side lists the other as a peer after either joins; only the joiner holds a key from it.)"""
    async with opened(joiner.path / DATABASE_FILE) as store:
        peer = await store.peers.peer(issuer_id)
    return peer is not None and peer.status == "active" and bool(peer.key_from_them)


async def _deployment_of(node: Node, request_id: str) -> str:
    async with opened(node.path / DATABASE_FILE) as store:
        rows = await store.usage.usage_since(int((time.time() - 3600) * 1000))
    for row in rows:
        if row.request_id == request_id:
            return row.deployment or "-"
    return "-"


# --- in messages ------------------------------------------------------------------------------


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _short(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
