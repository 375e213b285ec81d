"""`aihub init`, `aihub config check` and `aihub models`: making a node and looking at its
config."""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from node.cli.folder import require_config, require_secrets
from node.cli.options import with_data_dir
from node.cli.output import aihub_invocation, console, fail, shown, typed_path, venv_hint
from node.config import CONFIG_FILE, Config, ConfigError

DEFAULT_HOME = Path("~/.aihub").expanduser()


@click.command("init")
@click.option("--name", help="A name for this node, shown to peers [default: the host name]")
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    help="The port it serves on, written to its config [default: 8787]",
)
@click.option("--if-missing", is_flag=True, help="Do nothing if a node already exists here")
@with_data_dir
def init(directory: Path, name: str | None, port: int | None, if_missing: bool) -> None:
    """Create a node: config, database, Ed25519 identity and an admin key (shown once)."""
    from node.provision import NodeExists, create_node, node_exists

    if if_missing and node_exists(directory):
        console.print(f"Using the node at {escape(str(directory))}")
        return
    node_name = name or _default_name(directory)
    try:
        identity, key = create_node(directory, node_name, port)
    except (NodeExists, ConfigError) as exc:
        fail(str(exc))
    config = require_config(directory)
    console.print(f"Created node [bold]{escape(node_name)}[/] at {escape(str(directory))}")
    console.print(f"Node id: {identity.node_id}")
    console.print(f"\nAdmin key (shown once, keep it safe):\n  [bold green]{key}[/]\n")
    console.print(escape(examples(config, key, directory)), highlight=False, soft_wrap=True)


def _default_name(directory: Path) -> str:
    """The machine's short host name: what a peer would recognise."""
    return socket.gethostname().split(".")[0][:64] or directory.resolve().name or "aihub"


def examples(config: Config, key: str, directory: Path) -> str:
    """How to call the new node with its admin key, as commands that run as printed: curl,
    the openai package (a shell here-document, so nothing needs re-indenting) and the CLI."""
    url = f"http://{config.server.host}:{config.server.port}"
    body = '{"model": "echo", "messages": [{"role": "user", "content": "Hello, hub"}]}'
    python = _python_with_openai()
    aihub = aihub_invocation()
    hint = venv_hint()
    # Another terminal has no AIHUB_HOME of make's: name any folder but the default.
    folder = "" if directory.absolute() == DEFAULT_HOME.absolute() else f" --data-dir {directory}"
    lines = [
        "Try it with curl:",
        f"  curl {url}/v1/chat/completions \\",
        f'    -H "Authorization: Bearer {key}" \\',
        "    -H 'Content-Type: application/json' \\",
        f"    -d '{body}'",
        "",
        "Or with the openai Python package"
        + ("" if python != "python3" else " (pip install openai first)")
        + ":",
        f"  {python} - <<'EOF'",
        "from openai import OpenAI",
        f'client = OpenAI(base_url="{url}/v1", api_key="{key}")',
        'reply = client.chat.completions.create(model="echo", '
        'messages=[{"role": "user", "content": "Hello, hub"}])',
        "print(reply.choices[0].message.content)",
        "EOF",
        "",
        "The command line" + (f" {hint}" if hint else "") + ":",
        f"  {aihub} keys create --name my-app --budget 5{folder}",
        f"  {aihub} --help",
    ]
    return "\n".join(lines)


def _python_with_openai() -> str:
    """A Python that has the openai package: this one if it has it (make run's virtualenv
    does), else `python3` (after `pip install openai`)."""
    try:
        found = importlib.util.find_spec("openai") is not None
    except (ImportError, ValueError):  # a broken or blocked package is as good as none
        found = False
    if not found:
        return "python3"
    return typed_path(Path(sys.executable))


@click.command("models")
@with_data_dir
def models(directory: Path) -> None:
    """List the models this node serves: its own, then its peers' (`model@peer`)."""
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
    # Peers' models, as clients ask for them: `model@peer`, and bare where none of ours is.
    from node.cli.peer_models import peer_models

    for m in peer_models(directory, {d.name for d in config.models}):
        table.add_row(
            shown(m.name),
            m.kind,
            shown(f"peer {m.peer}"),
            shown(m.model),
            f"{m.price_in / 1e6:g}",
            f"{m.price_out / 1e6:g}",
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
    require_secrets(loaded)
    console.print(
        f"{escape(str(directory / CONFIG_FILE))}: ok ({len(loaded.models)} deployments, "
        f"{len({d.name for d in loaded.models})} models)",
        highlight=False,
    )
