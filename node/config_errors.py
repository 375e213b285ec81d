"""What is wrong with a config, said for the person editing it: msgspec's validation error
turned into `config.toml, line 12: models[2].provider: 'nope' is not one of openai, azure, …`.

msgspec names the place as a JSON path and a rule as its regex or its type; this module adds
the line of the TOML where the place is (found again in the text, since the TOML decoder keeps
no positions), the valid values of an enum (read from the config's own types), and rules in
words for the fields whose rule is a regex.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any

import msgspec

# Rules whose regex says nothing to most people, in words, by field (list indices dropped).
RULES = {
    ("models", "name"): "a model name is 1 to 256 characters with no spaces and no `@`",
    ("node", "name"): "a node name is 1 to 64 characters",
    ("node", "currency"): "a currency is three capital letters, an ISO 4217 code (USD, EUR, GBP)",
    ("models", "api_key_env"): (
        "an environment variable's name: letters, digits and `_`, not starting with a digit"
    ),
    ("alerts", "webhook_url"): "an http:// or https:// URL, or empty",
    ("federation", "public_urls"): (
        "a URL people and peers reach the node at: http:// or https://, a host and an optional "
        "port, no path (https://hub.example.org)"
    ),
}

_AT = re.compile(r" - at `([^`]*)`$")
_PART = re.compile(r"\.([A-Za-z0-9_-]+)|\[(\d+)\]")
_UNKNOWN = re.compile(r"^Object contains unknown field `(.*)`$")
_ENUM = re.compile(r"^Invalid enum value (.*)$")


def describe(error: msgspec.ValidationError, text: str, root: type) -> str:
    """`line N: place: what is wrong`, as much of it as can be known."""
    message = str(error)
    match = _AT.search(message)
    # msgspec names no place for an error in the top-level table itself.
    what = message if match is None else message[: match.start()]
    path = [] if match is None else parse_path(match.group(1))
    place = toml_path(path)
    target = path
    unknown = _UNKNOWN.match(what)
    if unknown:
        target = [*path, unknown.group(1)]
    elif (enum := _ENUM.match(what)) and (values := literal_values(root, path)):
        what = f"{enum.group(1)} is not one of {', '.join(values)}"
    elif "matching regex" in what and (rule := RULES.get(field_key(path))):
        what = f"{what.split(' matching regex')[0]}: {rule}"
    line = find_line(text, target)
    return f"{'' if line is None else f'line {line}: '}{place}: {what}"


def parse_path(json_path: str) -> list[str | int]:
    """`$.models[1].provider` -> ["models", 1, "provider"]."""
    return [
        name if name else int(index) for name, index in _PART.findall(json_path.removeprefix("$"))
    ]


def toml_path(path: list[str | int]) -> str:
    """["models", 1, "provider"] -> `models[1].provider`, as a TOML reader names it."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(top level)"


def field_key(path: list[str | int]) -> tuple[str, ...]:
    return tuple(part for part in path if isinstance(part, str))


def literal_values(root: type, path: list[str | int]) -> list[str]:
    """The values a Literal field at `path` of `root` may take, in the order the type
    declares them (empty if it is not one)."""
    kind: Any = root
    for part in path:
        kind = _unwrap(kind)
        if isinstance(part, int):
            if typing.get_origin(kind) is not list:
                return []
            kind = typing.get_args(kind)[0]
            continue
        if not (isinstance(kind, type) and issubclass(kind, msgspec.Struct)):
            return []
        hints = typing.get_type_hints(kind, include_extras=True)
        if part not in hints:
            return []
        kind = hints[part]
    kind = _unwrap(kind)
    if typing.get_origin(kind) is typing.Literal:
        return [str(value) for value in typing.get_args(kind)]
    return []


def _unwrap(kind: Any) -> Any:
    """Past `Annotated[…]` constraints and `| None` to the type with the fields or values."""
    while True:
        origin = typing.get_origin(kind)
        if origin is typing.Annotated:
            kind = typing.get_args(kind)[0]
        elif origin in (typing.Union, types.UnionType):
            rest = [arg for arg in typing.get_args(kind) if arg is not type(None)]
            if len(rest) != 1:
                return kind
            kind = rest[0]
        else:
            return kind


# --- finding a place in the TOML text -----------------------------------------------------

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(
    r"""^\s*((?:"[^"]*"|'[^']*'|[A-Za-z0-9_-]+)(?:\s*\.\s*(?:"[^"]*"|'[^']*'|[A-Za-z0-9_-]+))*)\s*="""
)


def _key_parts(text: str) -> list[str]:
    return [
        part.strip().strip("\"'")
        for part in re.findall(r"""\s*("[^"]*"|'[^']*'|[^.]+)\s*(?:\.|$)""", text.strip())
    ]


def find_line(text: str, target: list[str | int]) -> int | None:
    """The 1-based line where the TOML text sets `target` (a key, or a table by its header);
    None where it cannot be told (a multi-line value, an inline table)."""
    table: list[str | int] = []
    counts: dict[tuple[str | int, ...], int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            names: list[str | int] = list(_key_parts(header.group(2)))
            if header.group(1) == "[[":
                key = tuple(names)
                counts[key] = counts.get(key, -1) + 1
                names.append(counts[key])
            table = names
            if _same_place(table, target):
                return number
            continue
        key = _KEY.match(line)
        if key and _same_place([*table, *_key_parts(key.group(1))], target):
            return number
    return None


def _same_place(found: list[str | int], target: list[str | int]) -> bool:
    """A place found in the text is the target itself, or inside it (a table's header
    `[upstreams.x]`, or a dotted key `upstreams.x = 1`, for an unknown `upstreams`)."""
    return len(found) >= len(target) and found[: len(target)] == target
