"""The `aihub` command line."""

from __future__ import annotations

import functools
import logging
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from node import __version__
from node.config import (
    CONFIG_FILE,
    IDENTITY_FILE,
    Config,
    ConfigError,
    data_dir,
    load_config,
    missing_secrets,
)
from node.provision import NodeExists, create_node, node_exists

console = Console()
errors = Console(stderr=True)


def fail(message: str) -> None:
    errors.print(f"[bold red]error:[/] {message}", highlight=False)
    sys.exit(1)


def with_data_dir(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command `--data-dir` (default `$AIHUB_HOME`, else ~/.aihub) as a resolved Path."""

    @click.option(
        "--data-dir",
        "data_dir_option",
        envvar="AIHUB_HOME",
        type=click.Path(file_okay=False),
        help="The node's data folder [default: $AIHUB_HOME, else ~/.aihub]",
    )
    @functools.wraps(command)
    def wrapper(data_dir_option: str | None, **kwargs: Any) -> Any:
        return command(directory=data_dir(data_dir_option), **kwargs)

    return wrapper


def require_config(directory: Path) -> Config:
    try:
        return load_config(directory)
    except ConfigError as exc:
        fail(str(exc))
        raise  # unreachable: fail() exits


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="aihub")
def main() -> None:
    """aihub: a self-hosted, federated, OpenAI-compatible AI model hub."""


@main.command()
@click.option("--name", help="A name for this node, shown to peers [default: the host name]")
@click.option("--if-missing", is_flag=True, help="Do nothing if a node already exists here")
@with_data_dir
def init(directory: Path, name: str | None, if_missing: bool) -> None:
    """Create a node: config, database, Ed25519 identity and an admin key (shown once)."""
    if if_missing and node_exists(directory):
        console.print(f"Using the node at {directory}")
        return
    node_name = name or _default_name(directory)
    try:
        identity, key = create_node(directory, node_name)
    except NodeExists as exc:
        fail(str(exc))
        return
    config = require_config(directory)
    console.print(f"Created node [bold]{node_name}[/] at {directory}")
    console.print(f"Node id: {identity.node_id}")
    console.print(f"\nAdmin key (shown once, keep it safe):\n  [bold green]{key}[/]\n")
    console.print(examples(config, key), highlight=False, soft_wrap=True)


def _default_name(directory: Path) -> str:
    """The machine's short host name: what a peer would recognise."""
    return socket.gethostname().split(".")[0][:64] or directory.resolve().name or "aihub"


def examples(config: Config, key: str) -> str:
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


@main.command()
@click.option("--host", help="Interface to listen on [default: from the config]")
@click.option("--port", type=click.IntRange(1, 65535), help="[default: from the config]")
@click.option("--workers", type=click.IntRange(1, 64), help="[default: from the config]")
@click.option(
    "--server",
    type=click.Choice(["uvicorn", "granian"]),
    default="uvicorn",
    show_default=True,
    help="The ASGI server",
)
@with_data_dir
def serve(
    directory: Path, host: str | None, port: int | None, workers: int | None, server: str
) -> None:
    """Start the node."""
    config = require_config(directory)
    if not (directory / IDENTITY_FILE).exists():
        fail(f"no identity at {directory / IDENTITY_FILE}: run `aihub init`")
    for problem in missing_secrets(config, dict(os.environ)):
        errors.print(f"[yellow]warning:[/] {problem}", highlight=False)
    host = host or config.server.host
    port = port or config.server.port
    workers = workers or config.server.workers
    # Workers are separate processes: they find the node through the environment.
    os.environ["AIHUB_HOME"] = str(directory)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    url = f"http://{host}:{port}"
    console.print(
        f"aihub {__version__}: node [bold]{config.node.name}[/] serving "
        f"{', '.join(d.name for d in config.models) or 'no models'} at {url}/v1",
        highlight=False,
    )
    console.print(f'  curl {url}/v1/models -H "Authorization: Bearer $AIHUB_KEY"', highlight=False)
    if server == "granian":
        from granian import Granian
        from granian.constants import Interfaces

        Granian(
            "node.app:create_app",
            factory=True,
            address=host,
            port=port,
            workers=workers,
            interface=Interfaces.ASGI,
        ).serve()
        return
    import uvicorn

    uvicorn.run(
        "node.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="info",
        timeout_graceful_shutdown=10,
    )


@main.command()
@with_data_dir
def models(directory: Path) -> None:
    """List the models this node serves."""
    config = require_config(directory)
    table = Table(title=f"Models of {config.node.name}")
    for column in ("name", "kind", "provider", "upstream model", "in $/1M", "out $/1M"):
        table.add_column(column)
    for d in config.models:
        table.add_row(
            d.name,
            d.kind,
            d.provider,
            d.model or d.name,
            f"{d.price_in / 1e6:g}",
            f"{d.price_out / 1e6:g}",
        )
    console.print(table)


@main.group()
def config() -> None:
    """Inspect the node's config."""


@config.command("check")
@with_data_dir
def config_check(directory: Path) -> None:
    """Validate the config; say exactly what is wrong and where."""
    loaded = require_config(directory)
    problems = missing_secrets(loaded, dict(os.environ))
    for problem in problems:
        errors.print(f"[bold red]error:[/] {problem}", highlight=False)
    if problems:
        sys.exit(1)
    console.print(
        f"{directory / CONFIG_FILE}: ok ({len(loaded.models)} deployments, "
        f"{len({d.name for d in loaded.models})} models)",
        highlight=False,
    )


if __name__ == "__main__":
    main()
