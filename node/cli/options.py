"""Options the command modules share: `--data-dir`, callbacks that parse what people type
(`node.units`) into click's own usage errors, comma-separated lists, `none` for "no limit", and
the parts of the key and tenant options."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any, TypeVar

import click
from msgspec import UNSET, UnsetType

from node.cli.main import DATA_DIR_META
from node.config import data_dir
from node.units import parse_duration, parse_money, parse_since

T = TypeVar("T")
Callback = Callable[[click.Context, click.Parameter, str | None], T | None]
Decorator = Callable[[Any], Any]

NONE_WORDS = ("none", "null")
# What the duration, time and amount options take, said once for every command's help.
SINCE_HELP = (
    "From when: a duration back from now (30m, 24h, 7d), a UTC date (2025-01-31) or unix seconds"
)
DURATION_HELP = "a number with s, m, h, d or w (90s, 30m, 12h, 30d, 2w)"
MONEY_HELP = "an amount in the node's currency, e.g. 20 or 0.5"


def with_data_dir(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command `--data-dir` (default `$AIHUB_HOME`, else ~/.aihub) as a resolved Path.
    The folder may be given before the command too (`aihub --data-dir DIR keys list`), as
    people type it: it counts as given to the command, above `$AIHUB_HOME`, below the
    command's own `--data-dir`."""

    @click.option(
        "--data-dir",
        "data_dir_option",
        envvar="AIHUB_HOME",
        type=click.Path(file_okay=False),
        help="The node's data folder [default: $AIHUB_HOME, else ~/.aihub]",
    )
    @functools.wraps(command)
    def wrapper(data_dir_option: str | None, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        given_before = ctx.find_root().meta.get(DATA_DIR_META)
        source = ctx.get_parameter_source("data_dir_option")
        if given_before is not None and source is not click.core.ParameterSource.COMMANDLINE:
            data_dir_option = given_before
        return command(directory=data_dir(data_dir_option), **kwargs)

    return wrapper


def combined(*decorators: Decorator) -> Decorator:
    """One decorator that applies `decorators` as if stacked in this order."""

    def apply(command: Any) -> Any:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return apply


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


money_option = parsed(parse_money)
duration_option = parsed(parse_duration)
duration_or_zero_option = parsed(functools.partial(parse_duration, allow_zero=True))
since_option = parsed(parse_since)

# --- options that change a key or tenant --------------------------------------------------
# Not given: UNSET (left as it is); `none`: the limit removed.


def is_none(text: str) -> bool:
    return text.strip().lower() in NONE_WORDS


def money_or_none(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return UNSET
    if is_none(value):
        return None
    try:
        return parse_money(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def count_or_none(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return UNSET
    if is_none(value):
        return None
    from node.admin.management import MAX_COUNT

    text = value.strip()
    # ASCII digits only: str.isdigit() takes `²`, which int() refuses.
    if not re.fullmatch(r"\d{1,13}", text, re.ASCII) or not 1 <= int(text) <= MAX_COUNT:
        raise click.BadParameter(f"a whole number from 1 to {MAX_COUNT}, or none; not {value!r}")
    return int(text)


def globs_or_none(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return UNSET
    if is_none(value):
        return None
    globs = comma_list(value)
    if not globs:
        raise click.BadParameter("comma-separated model names or globs, or none for every model")
    return globs


def ips_or_none(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return UNSET
    if is_none(value):
        return []
    from node.gateway.policy import parse_networks

    ips = comma_list(value)
    try:
        parse_networks(ips)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    return ips


def text_or_none(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return UNSET
    return None if is_none(value) else value


def expiry(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    """`never` -> ("expires_at", None); `30d` -> ("expires_in", 2592000)."""
    if value is None:
        return UNSET
    if value.strip().lower() in ("never", *NONE_WORDS):
        return ("expires_at", None)
    try:
        return ("expires_in", parse_duration(value))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def metadata(
    _ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]
) -> dict[str, str] | UnsetType:
    if not value:
        return UNSET
    found: dict[str, str] = {}
    for item in value:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"metadata is key=value, not {item!r}")
        found[name.strip()] = text
    return found


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON")
