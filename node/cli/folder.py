"""The node's data folder a command works on: its config, its identity, and the management
layer opened on it.

The commands work on the folder directly (access to it is the admin's credential); a running
node sees every change on its next request, through the epoch files.
"""

from __future__ import annotations

import getpass
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from rich.markup import escape

from federation.printable import printable
from node.cli.output import errors, fail, warn
from node.config import IDENTITY_FILE, Config, ConfigError, load_config

if TYPE_CHECKING:
    from node.admin.management import Management

T = TypeVar("T")


def require_config(directory: Path) -> Config:
    """The node's config; a missing or broken one fails the command, saying where."""
    try:
        return load_config(directory)
    except ConfigError as exc:
        fail(str(exc))


def require_secrets(config: Config) -> None:
    """Every provider key the config names is in the environment, or the command fails
    listing each one missing: `config check` and `serve` refuse alike, so that no
    deployment is ever called without its key."""
    import os

    from node.config import missing_secrets

    problems = missing_secrets(config, dict(os.environ))
    for problem in problems:
        errors.print(f"[bold red]error:[/] {escape(printable(problem))}", highlight=False)
    if problems:
        fail(
            "set the provider keys above in the environment, or comment out the deployments "
            "that need them in config.toml"
        )


def require_identity(directory: Path) -> None:
    if not (directory / IDENTITY_FILE).exists():
        fail(f"no identity at {directory / IDENTITY_FILE}: run `aihub init`")


def currency_of(directory: Path) -> str:
    """The currency the node's amounts are in, to show them in."""
    return require_config(directory).node.currency


def cli_actor() -> str:
    """Who the audit log names for a change made here."""
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return "cli"


def manage(directory: Path, work: Callable[[Management], Awaitable[T]]) -> T:
    """Run `work` on the node's data folder; a refused change fails the command, and the
    node's processes that did not confirm a change in time are named (on stderr)."""
    # Imported here: the store and the key hashing are for the commands that change keys,
    # not for `config check` or a command's --help.
    import asyncio

    from node.admin.management import Management, ManagementError

    require_config(directory)
    require_identity(directory)

    async def run() -> T:
        management = await Management.open(directory)
        try:
            done = await work(management)
        finally:
            await management.close()
        for problem in management.unconfirmed:
            warn(problem)
        return done

    try:
        return asyncio.run(run())
    except ManagementError as exc:
        fail(exc.message)
