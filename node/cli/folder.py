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

from node.cli.output import fail
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
    """Run `work` on the node's data folder; a refused change fails the command."""
    # Imported here: the store and the key hashing are for the commands that change keys,
    # not for `config check` or a command's --help.
    import asyncio

    from node.admin.management import Management, ManagementError

    require_config(directory)
    require_identity(directory)

    async def run() -> T:
        management = await Management.open(directory)
        try:
            return await work(management)
        finally:
            await management.close()

    try:
        return asyncio.run(run())
    except ManagementError as exc:
        fail(exc.message)
