"""Fixtures: real nodes in temporary data folders, served on loopback ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_aiohttp import AiohttpTransport

from node.app import create_app
from node.config import CONFIG_FILE, load_config
from node.ingress.connections import guarded_protocol
from node.provision import create_node
from tests.mocks.server import serve_app

# PostgreSQL for the storage tests and the multi-process tests: `postgres`, `postgres_url`,
# `store_url` (each backend in turn).
pytest_plugins = ["tests.postgres"]

# pytest-xdist's workers inherit COLUMNS=80 from the controller, where a serial run has none;
# rich fixes a console's width from COLUMNS once, when the console is made, so the CLI's
# consoles would stay 80 wide in every later CliRunner call that sets its own COLUMNS.
os.environ.pop("COLUMNS", None)

# `aihub serve` runs one worker per core unless the config names `workers`: the nodes the tests
# start serve one process each (the suite runs a test file per core already), and the tests
# of several processes say `--workers` themselves. What a child process inherits.
os.environ["WEB_CONCURRENCY"] = "1"


@dataclass
class NodeDir:
    path: Path
    key: str

    def add_config(self, toml: str) -> None:
        """Append TOML (e.g. `[[models]]` entries) to the node's config."""
        with (self.path / CONFIG_FILE).open("a") as file:
            file.write("\n" + toml + "\n")

    def set_router(self, toml: str) -> None:
        """Replace the whole `[router]` section (and its fallbacks) with `toml`."""
        path = self.path / CONFIG_FILE
        text = path.read_text()
        start = text.index("[router]\n")
        end = text.index("# Each [[models]] entry")
        path.write_text(text[:start] + "[router]\n" + toml + "\n\n" + text[end:])

    def set_config(self, old: str, new: str) -> None:
        path = self.path / CONFIG_FILE
        text = path.read_text()
        assert old in text, f"{old!r} not in config"
        path.write_text(text.replace(old, new, 1))


@dataclass
class RunningNode:
    dir: NodeDir
    url: str

    @property
    def key(self) -> str:
        return self.dir.key

    def client(self, timeout: float = 30) -> httpx.Client:
        headers = {"authorization": f"Bearer {self.key}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)


def concurrent_client(url: str, connections: int) -> httpx.AsyncClient:
    """An async client for many requests at once: httpx's own pool collapses under
    concurrency (encode/httpx#3215), so this one runs on aiohttp's, as the node does."""
    limits = httpx.Limits(max_connections=connections)
    return httpx.AsyncClient(base_url=url, transport=AiohttpTransport(limits=limits), timeout=60)


@pytest.fixture
def node_dir(tmp_path: Path) -> NodeDir:
    _, key = create_node(tmp_path / "alice", "alice")
    return NodeDir(tmp_path / "alice", key)


@contextmanager
def run_node(
    directory: NodeDir, port: int = 0, sock: socket.socket | None = None, http: Any = None
) -> Iterator[RunningNode]:
    """Serve the node in `directory` for real (uvicorn, lifespan, loopback port or `sock`), on
    the connection protocol `aihub serve` runs (`node/ingress/connections.py`) unless `http`
    names another."""
    app = create_app(directory.path)
    protocol = http or guarded_protocol(load_config(directory.path).server)
    with serve_app(app, lifespan="on", port=port, sock=sock, http=protocol) as url:
        yield RunningNode(directory, url)


@contextmanager
def serve_process(
    directory: Path, port: int, log: Path, *args: str
) -> Iterator[subprocess.Popen[bytes]]:
    """A real `aihub serve --port PORT` (not the config's port; `args` after it) in its own
    process, its stderr in `log`; ready when entered, terminated on leaving."""
    command = [sys.executable, "-m", "node.cli", "serve", "--port", str(port), *args]
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [*command, "--data-dir", str(directory)], stdout=subprocess.DEVNULL, stderr=stderr
        )
    try:
        wait_ready(f"http://127.0.0.1:{port}", process)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    """Wait for a real `aihub serve` to answer /health/ready; fail with its stderr if it
    exits first."""
    for _ in range(400):
        if process.poll() is not None:
            stderr = process.stderr.read().decode() if process.stderr else ""
            raise AssertionError(f"aihub serve exited with {process.returncode}: {stderr}")
        try:
            if httpx.get(url + "/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("aihub serve did not become ready")
