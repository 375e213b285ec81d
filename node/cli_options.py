"""Pieces shared by the CLI's command modules: option callbacks that parse what people type
(`node.units`) into click's own usage errors, and comma-separated lists."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click

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
