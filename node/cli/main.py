"""The `aihub` command line: the group, and the command groups added to it (one module each)."""

from __future__ import annotations

import click

from node import __version__
from node.cli.db import db_group
from node.cli.discovery import peers_discover
from node.cli.federation import invite_group, join, peers_group
from node.cli.keys import keys_group
from node.cli.ledger import ledger
from node.cli.network import network
from node.cli.node_setup import config, init, models
from node.cli.serve import serve
from node.cli.tenants import tenants_group
from node.cli.usage import audit_command, usage_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="aihub")
def main() -> None:
    """aihub: a self-hosted, federated, OpenAI-compatible AI model hub."""


peers_group.add_command(peers_discover)
for command in (
    init,
    serve,
    models,
    config,
    keys_group,
    tenants_group,
    usage_command,
    audit_command,
    invite_group,
    join,
    peers_group,
    ledger,
    db_group,
    network,
):
    main.add_command(command)
