"""Pieces shared by the CLI's command modules: option callbacks that parse what people type
(`node.units`) into click's own usage errors, comma-separated lists, and text others chose
made safe to show."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click
from rich.text import Text

from federation.printable import printable

T = TypeVar("T")
Callback = Callable[[click.Context, click.Parameter, str | None], T | None]


def parsed(parse: Callable[[str], T]) -> Callback[T]:
    """A click callback that parses an option's text with `parse`; a ValueError becomes
    click's "Invalid value" error naming the option. An option not given stays None."""

    def callback(_ctx: click.Context, _param: click.Parameter, value: str | None) -> T | None:
        if value is None:
            return None
        try:
            return parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from exc

    return callback


def comma_list(text: str) -> list[str]:
    """`a, b,,c ` -> ["a", "b", "c"]."""
    return [part.strip() for part in text.split(",") if part.strip()]


def shown(value: str) -> Text:
    """What someone else chose (a peer's or a key's name, a URL), for a rich table or line:
    taken literally (no markup) and with control characters shown escaped."""
    return Text(printable(value))
