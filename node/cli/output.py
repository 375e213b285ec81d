"""What the commands print with: the two consoles, failing a command, JSON, times, and text
others chose made safe to show."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
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
