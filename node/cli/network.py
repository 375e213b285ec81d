"""`aihub network up` and `aihub network down`: a three-node network on this machine, and the
story of one request across it. This module only parses the options and prints; the demo is
`node.demo.network` (imported when a command runs), the story it tells `node.demo.story`."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from node.cli.output import aihub_invocation, console
from node.demo import DEFAULT_BASE_PORT, DEFAULT_DIR

# `--data-dir`, as every command has; `--dir`, its first name, still works.
dir_option = click.option(
    "--data-dir",
    "--dir",
    "root",
    default=DEFAULT_DIR,
    show_default=True,
    type=click.Path(file_okay=False),
    help="The network's folder: one data folder per node (alice/, bob/, carol/)",
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
    import msgspec

    from node.demo.network import Network, NetworkError, in_process
    from node.demo.story import story

    try:
        say = _quiet if as_json else _say
        net = Network(Path(root), base_port, in_process(_aihub()), say, aihub_invocation())
        report = net.up()
    except NetworkError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(msgspec.json.encode(report).decode())
        return
    for text, style in story(report, root, aihub_invocation()):
        _say(text, style)


@network.command("down")
@dir_option
def down(root: str) -> None:
    """Stop the network's nodes (SIGTERM, then SIGKILL after 10 s); keep their data."""
    from node.demo.network import Network, NetworkError, in_process

    try:
        net = Network(Path(root), DEFAULT_BASE_PORT, in_process(_aihub()), _say, aihub_invocation())
        stopped = net.down()
    except NetworkError as exc:
        raise click.ClickException(str(exc)) from exc
    for entry in stopped:
        pid = f" (pid {entry.pid})" if entry.pid else ""
        _say(f"{entry.name}: {entry.state}{pid}")
    _say(
        f"The data is kept in {net.root}; `{aihub_invocation()} network up --data-dir {root}` "
        "starts it again."
    )
