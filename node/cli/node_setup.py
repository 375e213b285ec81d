"""`aihub init`, `aihub config check` and `aihub models`: making a node and looking at its
config."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from federation.printable import printable
from node.cli.folder import require_config
from node.cli.options import with_data_dir
from node.cli.output import console, errors, fail, shown
from node.config import CONFIG_FILE, Config, ConfigError, missing_secrets
from node.provision import NodeExists, create_node, node_exists


@click.command("init")
@click.option("--name", help="A name for this node, shown to peers [default: the host name]")
@click.option("--if-missing", is_flag=True, help="Do nothing if a node already exists here")
@with_data_dir
def init(directory: Path, name: str | None, if_missing: bool) -> None:
    """Create a node: config, database, Ed25519 identity and an admin key (shown once)."""
    if if_missing and node_exists(directory):
        console.print(f"Using the node at {escape(str(directory))}")
        return
    node_name = name or _default_name(directory)
    try:
        identity, key = create_node(directory, node_name)
    except (NodeExists, ConfigError) as exc:
        fail(str(exc))
    config = require_config(directory)
    console.print(f"Created node [bold]{escape(node_name)}[/] at {escape(str(directory))}")
    console.print(f"Node id: {identity.node_id}")
    console.print(f"\nAdmin key (shown once, keep it safe):\n  [bold green]{key}[/]\n")
    console.print(examples(config, key), highlight=False, soft_wrap=True)


def _default_name(directory: Path) -> str:
    """The machine's short host name: what a peer would recognise."""
    return socket.gethostname().split(".")[0][:64] or directory.resolve().name or "aihub"


def examples(config: Config, key: str) -> str:
    """How to call the new node with its admin key: curl, and the openai package."""
    url = f"http://{config.server.host}:{config.server.port}"
    body = '{"model": "echo", "messages": [{"role": "user", "content": "Hello, hub"}]}'
    return (
        "Try it with curl:\n"
        f"  curl {url}/v1/chat/completions \\\n"
        f'    -H "Authorization: Bearer {key}" \\\n'
        f"    -H 'Content-Type: application/json' \\\n"
        f"    -d '{body}'\n\n"
        "Or with the openai Python package:\n"
        "  from openai import OpenAI\n"
        f'  client = OpenAI(base_url="{url}/v1", api_key="{key}")\n'
        '  reply = client.chat.completions.create(model="echo", '
        'messages=[{"role": "user", "content": "Hello, hub"}])\n'
        "  print(reply.choices[0].message.content)"
    )


@click.command("models")
@with_data_dir
def models(directory: Path) -> None:
    """List the models this node serves."""
    config = require_config(directory)
    table = Table(title=shown(f"Models of {config.node.name}"))
    for column in ("name", "kind", "provider", "upstream model", "in $/1M", "out $/1M"):
        table.add_column(column)
    for d in config.models:
        table.add_row(
            shown(d.name),
            d.kind,
            d.provider,
            shown(d.model or d.name),
            f"{d.price_in / 1e6:g}",
            f"{d.price_out / 1e6:g}",
        )
    console.print(table)


@click.group("config")
def config() -> None:
    """Inspect the node's config."""


@config.command("check")
@with_data_dir
def config_check(directory: Path) -> None:
    """Validate the config; say exactly what is wrong and where."""
    loaded = require_config(directory)
    problems = missing_secrets(loaded, dict(os.environ))
    storage = loaded.storage
    if storage.password_env and not os.environ.get(storage.password_env):
        problems.append(
            f"storage.password_env: environment variable {storage.password_env} is not set"
        )
    for problem in problems:
        errors.print(f"[bold red]error:[/] {escape(printable(problem))}", highlight=False)
    if problems:
        sys.exit(1)
    console.print(
        f"{escape(str(directory / CONFIG_FILE))}: ok ({len(loaded.models)} deployments, "
        f"{len({d.name for d in loaded.models})} models)",
        highlight=False,
    )
