"""What the commands print with: the two consoles, failing a command, JSON, times, and text
others chose made safe to show."""

from __future__ import annotations

import os
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

import click
import msgspec
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from federation.printable import printable

# One of each for every command: tests (and a wide terminal) set their width in one place.
console = Console()
errors = Console(stderr=True)


def aihub_invocation() -> str:
    """How to type this installation's `aihub` in the user's shell, so that the commands a
    command prints work as printed: `aihub` where the PATH finds this very script, else the
    script's path (relative to the working directory when it is under it, as `.venv/bin/aihub`
    after `make run`), else `python -m node.cli` with this interpreter."""
    script = Path(sys.executable).parent / "aihub"
    if not script.exists():
        return f"{typed_path(Path(sys.executable))} -m node.cli"
    found = shutil.which("aihub")
    if found and Path(found).absolute() == script.absolute():
        return "aihub"
    return typed_path(script)


def typed_path(path: Path) -> str:
    """A path as the user would type it here: relative to the working directory when under it."""
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def venv_hint() -> str | None:
    """How to put `aihub` on the PATH, where it is not: activating its virtualenv."""
    if aihub_invocation() == "aihub" or sys.prefix == sys.base_prefix:
        return None
    activate = Path(sys.prefix) / "bin" / "activate"
    if not activate.exists() or os.name == "nt":
        return None
    return f"(or put it on your PATH: . {typed_path(activate)})"


def fail(message: str) -> NoReturn:
    """Print `error: MESSAGE` on stderr and exit with status 1."""
    # The message may quote what the user typed: no markup, no `:emoji:` codes, taken literally.
    errors.print(f"[bold red]error:[/] {escape(printable(message))}", highlight=False, emoji=False)
    sys.exit(1)


def warn(message: str) -> None:
    errors.print(f"[yellow]warning:[/] {escape(printable(message))}", highlight=False)


def shown(value: str) -> Text:
    """What someone else chose (a peer's or a key's name, a URL), for a rich table or line:
    taken literally (no markup) and with control characters shown escaped."""
    return Text(printable(value))


def short_id(node_id: str) -> str:
    """A node id cut to what tells nodes apart in a table or a line (`--wide` or JSON: in
    full), so that an 80-column table keeps a row on one line."""
    prefix, _, key = node_id.partition(":")
    return f"{prefix}:{key[:8]}…" if len(key) > 8 else node_id


def print_json(value: object) -> None:
    """Indented JSON, for the key, tenant, usage and audit commands."""
    click.echo(msgspec.json.format(msgspec.json.encode(value), indent=2).decode())


def echo_json(value: object) -> None:
    """JSON on one line, for the peer, discovery and ledger commands."""
    click.echo(msgspec.json.encode(value).decode())


def when(seconds: int | None, empty: str = "never") -> str:
    """Unix seconds as a UTC time; `empty` for none."""
    if seconds is None:
        return empty
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def details(rows: list[tuple[str, str]]) -> None:
    """Label / value rows, as `keys show` and `tenants show` print one record."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for label, value in rows:
        grid.add_row(shown(label), shown(value))
    console.print(grid)
