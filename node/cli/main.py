"""The `aihub` command line: the group, and the command groups added to it (one module each).

The command modules are imported only when their command runs (or its `--help` is asked
for): importing them all costs about a second (the admin API's Litestar, aiohttp, the peer
transport), and `aihub --version` or `aihub keys list` should start at once. So the group knows
each command by the module that holds it and a one-line summary for `aihub --help`;
tests/test_cli.py checks that each summary is its command's own first docstring line.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

import click

from node import __version__

# Where `aihub --data-dir DIR COMMAND` (the folder given before the command) is kept for the
# command (`node.cli.options.with_data_dir`), which commonly takes the option itself.
DATA_DIR_META = "aihub.data_dir"


class Entry(NamedTuple):
    """Where a top-level command lives, and what `aihub --help` says of it."""

    module: str
    attribute: str
    summary: str


COMMANDS: dict[str, Entry] = {
    "init": Entry(
        "node.cli.node_setup",
        "init",
        "Create a node: config, database, Ed25519 identity and an admin key (shown once).",
    ),
    "serve": Entry("node.cli.serve", "serve", "Start the node."),
    "models": Entry(
        "node.cli.node_setup",
        "models",
        "List the models this node serves: its own, then its peers' (`model@peer`).",
    ),
    "config": Entry("node.cli.node_setup", "config", "Inspect the node's config."),
    "admin-key": Entry(
        "node.cli.admin_key", "admin_key", "Recover access to a node whose admin key is lost."
    ),
    "keys": Entry(
        "node.cli.keys", "keys_group", "Create, list, change, rotate and revoke API keys."
    ),
    "tenants": Entry(
        "node.cli.tenants",
        "tenants_group",
        "Create, list and change tenants: groups of keys with shared limits.",
    ),
    "usage": Entry(
        "node.cli.usage",
        "usage_command",
        "Requests, tokens and cost, grouped by key, tenant or model.",
    ),
    "audit": Entry(
        "node.cli.usage",
        "audit_command",
        "Who changed what, and the security events (bad keys, refused addresses), newest first.",
    ),
    "logs": Entry(
        "node.cli.logs",
        "logs_command",
        "The requests and answers of the keys and tenants that log them, newest first; with "
        "REQUEST_ID, that one whole.",
    ),
    "invite": Entry(
        "node.cli.federation", "invite_group", "Invite another node to use this node's models."
    ),
    "join": Entry(
        "node.cli.federation",
        "join",
        "Join the node that issued TOKEN: become its peer and use its shared models.",
    ),
    "peers": Entry(
        "node.cli.peers",
        "peers_group",
        "This node's peers: list, revoke, and join requests without an invite.",
    ),
    "ledger": Entry(
        "node.cli.ledger",
        "ledger",
        "The signed ledger: balances, verification, reconciliation, settlement.",
    ),
    "db": Entry(
        "node.cli.db", "db_group", "The node's store: its schema, and moving it to PostgreSQL."
    ),
    "network": Entry(
        "node.cli.network",
        "network",
        "A three-node network on this machine (alice, bob, carol), for trying federation.",
    ),
}


def load(name: str) -> click.Command:
    entry = COMMANDS[name]
    command = getattr(importlib.import_module(entry.module), entry.attribute)
    assert isinstance(command, click.Command), name
    return command


class LazyGroup(click.Group):
    """A group whose commands are imported when one of them is resolved."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        return load(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # The summaries, not the commands: listing them imports nothing.
        with formatter.section("Commands"):
            formatter.write_dl([(name, entry.summary) for name, entry in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="aihub")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    help="The node's data folder, for the command that follows (which takes it too)",
)
@click.pass_context
def main(ctx: click.Context, data_dir: str | None) -> None:
    """aihub: a self-hosted, federated, OpenAI-compatible AI model hub.

    Every command works on one node's data folder: --data-dir, else $AIHUB_HOME, else
    ~/.aihub."""
    if data_dir is not None:
        ctx.meta[DATA_DIR_META] = data_dir
