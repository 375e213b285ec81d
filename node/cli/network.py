"""`aihub network up` and `aihub network down`: a three-node network on this machine, and the
story of one request across it. This module only parses the options and prints; the demo is
`node.demo.network`, the story it tells `node.demo.story`."""

from __future__ import annotations

from pathlib import Path

import click
import msgspec
from rich.markup import escape

from node.cli.output import console
from node.demo.network import DEFAULT_BASE_PORT, DEFAULT_DIR, Network, NetworkError, in_process
from node.demo.story import story

dir_option = click.option(
    "--dir",
    "root",
    default=DEFAULT_DIR,
    show_default=True,
    type=click.Path(file_okay=False),
    help="The network's folder: one data folder per node",
)


def _say(line: str, style: str | None = None) -> None:
    console.print(escape(line), style=style, highlight=False, soft_wrap=True)


def _quiet(_line: str) -> None:
    pass


def _aihub() -> click.Group:
    """The `aihub` group this command runs under: the demo runs its commands in process."""
    root = click.get_current_context().find_root().command
    assert isinstance(root, click.Group)
    return root


@click.group("network")
def network() -> None:
    """A three-node network on this machine (alice, bob, carol), for trying federation."""


@network.command("up")
@dir_option
@click.option(
    "--base-port",
    type=click.IntRange(1, 65533),
    default=DEFAULT_BASE_PORT,
    show_default=True,
    help="alice's port; bob and carol take the next two (an existing network keeps its own)",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON")
def up(root: str, base_port: int, as_json: bool) -> None:
    """Start alice, bob and carol on loopback (or reuse them), have bob and carol join alice
    and alice join carol by invite, ask carol for a model only alice serves, and show who
    served it, the receipt both keep and the balances on each side."""
    try:
        net = Network(Path(root), base_port, in_process(_aihub()), _quiet if as_json else _say)
        report = net.up()
    except NetworkError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(msgspec.json.encode(report).decode())
        return
    for text, style in story(report, root):
        _say(text, style)


@network.command("down")
@dir_option
def down(root: str) -> None:
    """Stop the network's nodes (SIGTERM, then SIGKILL after 10 s); keep their data."""
    try:
        net = Network(Path(root), DEFAULT_BASE_PORT, in_process(_aihub()), _say)
        stopped = net.down()
    except NetworkError as exc:
        raise click.ClickException(str(exc)) from exc
    for entry in stopped:
        pid = f" (pid {entry.pid})" if entry.pid else ""
        _say(f"{entry.name}: {entry.state}{pid}")
    _say(f"The data is kept in {net.root}; `aihub network up --dir {root}` starts it again.")
