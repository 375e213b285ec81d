"""The `aihub` command starts at once: what each command imports before it does its work.

Measured by the import graph, not by a stopwatch (the machine is shared): a real
`python -X importtime -m node.cli …` process lists every module it imported, and the heavy ones
(the web stack, the HTTP clients, mDNS, the server) must not be among them for commands that
have no use for them. The times these imports cost, and the command's start-up time, are in
bench/README.md (hyperfine)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from node.cli.main import COMMANDS, load, main
from node.provision import create_node

# What a command that serves nothing, fetches nothing and announces nothing must not import:
# each costs from 50 ms (httpx) to 0.6 s (litestar) on the 2-core VM of bench/README.md.
SERVER_STACK = {
    "litestar",
    "aiohttp",
    "httpx",
    "zeroconf",
    "ifaddr",
    "uvicorn",
    "granian",
    "apscheduler",
    "prometheus_client",
    "uvloop",
}
# What `--version` and `--help` need even less: no store, no identity, no tables.
EVERYTHING_BUT_CLICK = SERVER_STACK | {"rich", "msgspec", "nacl", "aiosqlite", "asyncio"}


def imported(args: list[str], home: Path) -> set[str]:
    """The top-level packages `aihub ARGS` imported, from `-X importtime`'s report."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIHUB_")}
    env["AIHUB_HOME"] = str(home)
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "node.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", result.stderr, re.M)
    assert len(names) > 50, result.stderr[:2000]  # the report was read
    return {name.split(".")[0] for name in names}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("startup") / "node"
    create_node(folder, "quick")
    return folder


@pytest.mark.parametrize("args", [["--version"], ["--help"]])
def test_version_and_help_import_only_click(args: list[str], home: Path) -> None:
    assert "click" in imported(args, home)
    assert not imported(args, home) & EVERYTHING_BUT_CLICK


LIGHT = [
    ["config", "check"],
    ["init", "--help"],
    ["serve", "--help"],
    ["admin-key", "reset", "--help"],
    ["network", "up", "--help"],
]
LOCAL = [
    ["models"],  # peers' models come from the store
    ["keys", "list"],
    ["keys", "create", "--help"],
    ["keys", "update", "--help"],
    ["tenants", "list"],
    ["usage"],
    ["audit"],
    ["logs"],
    ["ledger", "--help"],
    ["ledger", "export", "--help"],
    ["ledger", "balance"],  # the books are read from the store; no peer is asked
    ["peers", "list"],
    ["peers", "pending"],
    ["peers", "approve", "--help"],
    ["peers", "discover", "--help"],  # mDNS and the HTTP client only when it looks
    ["invite", "create", "--help"],
    ["join", "--help"],
]


@pytest.mark.parametrize("args", LIGHT, ids=" ".join)
def test_commands_about_the_config_open_no_store_and_no_server(args: list[str], home: Path) -> None:
    found = imported(args, home)
    assert not found & (SERVER_STACK | {"aiosqlite", "nacl"}), found & EVERYTHING_BUT_CLICK


@pytest.mark.parametrize("args", LOCAL, ids=" ".join)
def test_commands_on_the_data_folder_import_no_server_stack(args: list[str], home: Path) -> None:
    found = imported(args, home)
    assert not found & SERVER_STACK, found & SERVER_STACK


def test_a_command_that_is_really_run_does_its_work(home: Path) -> None:
    """The same process, run for real: the lazily imported command still works."""
    found = imported(["keys", "create", "--name", "quick-app", "--json"], home)
    assert "aiosqlite" in found and not found & SERVER_STACK


def test_serve_imports_the_server_only_when_it_serves(home: Path) -> None:
    assert "uvicorn" not in imported(["serve", "--help"], home)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_summary_is_its_commands_own_first_line(name: str) -> None:
    """`aihub --help` lists the summaries without importing the commands: they must say
    what the commands' own help says."""
    command = load(name)
    assert command.name == name
    first = " ".join((command.help or "").split("\n\n")[0].split())
    assert COMMANDS[name].summary == first


def test_every_command_resolves_through_the_group() -> None:
    ctx = click.Context(main)
    assert main.list_commands(ctx) == list(COMMANDS)
    for name in COMMANDS:
        assert isinstance(main.get_command(ctx, name), click.Command)
    assert main.get_command(ctx, "no-such-command") is None
