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
from contextlib import redirect_stderr, redirect_stdout, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import httpx
import msgspec

from federation.identity import NodeIdentity
from node.config import CONFIG_FILE, DATABASE_FILE, IDENTITY_FILE, load_config, parse_config
from node.provision import create_node, node_exists
from node.storage import opened

DEFAULT_DIR = "./.aihub-network"
DEFAULT_BASE_PORT = 8801
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
PID_FILE = "aihub.pid"
LOG_FILE = "aihub.log"
KEY_FILE = "admin.key"
HEALTH_INTERVAL = 2
READY_TIMEOUT = 30.0
SETTLE_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

Say = Callable[[str], None]
CommandRunner = Callable[[list[str]], str]


class NetworkError(Exception):
    """The network could not be brought up (or down); the message says what and where."""


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
    return [sys.executable, "-m", "node.cli.main"]


@dataclass
class Node:
    name: str
    path: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.path / PID_FILE

    @property
    def log_file(self) -> Path:
        return self.path / LOG_FILE

    @property
    def key_file(self) -> Path:
        return self.path / KEY_FILE

    def admin_key(self) -> str:
        try:
            return self.key_file.read_text().strip()
        except FileNotFoundError:
            raise NetworkError(
                f"{self.key_file} is missing: this network's {self.name} was not made by "
                f"`aihub network up`; remove {self.path.parent} to start afresh"
            ) from None

    def node_id(self) -> str:
        return NodeIdentity.load(self.path / IDENTITY_FILE).node_id

    def data_dir_args(self) -> list[str]:
        return ["--data-dir", str(self.path)]


# --- what `up` reports ------------------------------------------------------------------------


class NodeState(msgspec.Struct):
    name: str
    url: str
    node_id: str
    data_dir: str
    pid: int
    state: str  # created and started | started | already running


class JoinState(msgspec.Struct):
    joiner: str
    issuer: str
    state: str  # joined | already joined


class Served(msgspec.Struct):
    status: int
    model: str
    asked: str  # the node the client asked
    key_file: str  # the file holding that node's admin key, used for the request
    content: str
    request_id: str
    cost_micros: int
    owner: str  # who the asked node lists as the model's owner (`/v1/models` owned_by)
    deployment: str  # the asked node's usage record: which deployment served it
    provider_usage: dict[str, Any]  # `aihub usage --by model --json` row of the model, at alice
    consumer_usage: dict[str, Any]  # the same at carol


class Report(msgspec.Struct):
    dir: str
    provider: str  # the node that serves the demo model
    consumer: str  # the node that was asked for it
    nodes: list[NodeState]
    joins: list[JoinState]
    request: Served
    # The receipt of that request as each side exports it (`aihub ledger export --format json`).
    receipt_provider: dict[str, Any]
    receipt_consumer: dict[str, Any]
    # Each side's row for the other (`aihub ledger balance --json`).
    balance_provider: dict[str, Any]
    balance_consumer: dict[str, Any]
    names: dict[str, str]  # node id -> name


class Stopped(msgspec.Struct):
    name: str
    pid: int | None
    state: str  # stopped | killed | not running | stale pid file


# --- the network ------------------------------------------------------------------------------


class Network:
    def __init__(self, root: Path, base_port: int, cli: CommandRunner, say: Say) -> None:
        self.root = root.expanduser().absolute()
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
        if not _alive(pid) or not _serves(pid, node.path):
            return None
        return pid

    def _start_all(self) -> set[str]:
        """Start every node that is not running, all at once; wait until each is ready."""
        stopped = [node for node in self.nodes if self._pid(node) is None]
        for node in stopped:
            if _listening(node):
                raise NetworkError(
                    f"port {node.port} is taken by something that is not this network's "
                    f"{node.name}: stop it, or use another --dir / --base-port"
                )
        starting: dict[str, subprocess.Popen[bytes]] = {}
        for node in stopped:
            self.say(f"Starting {node.name} at {node.url} (log: {node.log_file})")
            with node.log_file.open("ab") as log:
                process = subprocess.Popen(
                    [*aihub_command(), "serve", *node.data_dir_args()],
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
            if node.name not in starting and not _ready(node):
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
            if _ready(node):
                return
            time.sleep(0.1)
        raise NetworkError(
            f"{node.name} is not ready at {node.url} after {READY_TIMEOUT:g} s (`aihub network "
            f"down --dir {_short(self.root)}` stops what is running):\n" + _tail(node.log_file)
        )

    def _join(self, joiner: Node, issuer: Node) -> JoinState:
        if asyncio.run(_holds_key_from(joiner, issuer.node_id())):
            return JoinState(joiner.name, issuer.name, "already joined")
        self.say(f"$ aihub invite create --data-dir {_short(issuer.path)}")
        token = self.cli(["invite", "create", *issuer.data_dir_args()]).strip()
        self.say(f"$ aihub join {token[:16]}… --data-dir {_short(joiner.path)}")
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
                    f"{PROVIDER} its peer? (aihub peers list --data-dir {consumer.path})"
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
                if not _alive(pid):
                    outcome[name] = Stopped(name, pid, "stopped")
                    del running[name]
            time.sleep(0.05)
        for name, pid in running.items():
            self.say(f"{name} (pid {pid}) did not stop within {STOP_TIMEOUT:g} s: SIGKILL")
            _kill_group(pid)
            _wait_gone(pid, 5.0)
            outcome[name] = Stopped(name, pid, "killed")
        for node in self.nodes:
            node.pid_file.unlink(missing_ok=True)
        return [outcome[node.name] for node in self.nodes]


# --- processes --------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """Whether `pid` is a live process. A child of ours that has exited is reaped here (else
    it would linger as a zombie and look alive)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass  # not our child: ask the system
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def _command_line(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return None  # a Linux without this pid
    except OSError:
        return None
    try:  # macOS and the BSDs
        return subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, check=False
        ).stdout
    except OSError:
        return None


def _serves(pid: int, path: Path) -> bool:
    """Whether `pid` is an `aihub serve` of the node in `path` (a pid file may outlive its
    process, and the pid be given to another)."""
    command = _command_line(pid)
    return bool(command) and " serve " in f" {command} " and str(path) in command  # type: ignore[operator]


def _kill_group(pid: int) -> None:
    """SIGKILL the node's process group (it was started in a session of its own: any worker
    processes go with it)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _wait_gone(pid: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _ready(node: Node) -> bool:
    try:
        return httpx.get(node.url + "/health/ready", timeout=1).is_success
    except httpx.HTTPError:
        return False


def _listening(node: Node) -> bool:
    """Whether something answers HTTP on the node's port."""
    try:
        httpx.get(node.url, timeout=1)
    except httpx.HTTPError:
        return False
    return True


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
