"""A deterministic JSON instance of a JSON Schema: what the `echo` model answers when a client
asks for structured output (`response_format`, `text.format`, a tool's `parameters`).

The same schema and text always give the same instance, and the instance validates against
the schema for the keywords clients' schemas use (pydantic's, zod's, hand-written ones):
`type` (one or a list: the first that is not `null`), `const`, `enum` (the first value),
object `properties` (every required one; optional ones too while the instance is shallow) and
`additionalProperties`, `minProperties`, arrays (`items`, `prefixItems`, `minItems`,
`maxItems`, `uniqueItems` for scalar items), `anyOf`/`oneOf` (the first branch), `allOf`
(merged), `$ref` into the document (`#/$defs/…` as pydantic emits them, `#/definitions/…`),
numbers within `minimum`/`maximum` (exclusive too) and `multipleOf`, strings within
`minLength`/`maxLength`, the common `format`s, and `pattern`s made of literals, classes,
repeats, groups and alternatives. A plain string is the `text` it is given (the echo model
echoes the user's message into it).

Libraries that generate instances draw them at random, by design, and bring a generator
framework into a runtime that needs none: measured on a pydantic model (nested, list, enum,
optional, pattern), jsf (with Faker) gave 20 different valid instances in 20 calls at ~0.5 ms
each, hypothesis-jsonschema is a hypothesis strategy (its `.example()` is for interactive use
only); this one walk gives the same valid instance every time in ~0.1 ms, so it is written
here.

The schema is the client's, so the walk is bounded: past `MAX_DEPTH` nested values, or once
`MAX_VALUES` values are made, each value is the smallest of its type, and no array is longer
than `MAX_ITEMS`. A schema that needs more than that (or one no value satisfies) gets an
instance that may not validate, never an unbounded amount of work.
"""

from __future__ import annotations

import math
import re
from re import _parser as sre  # type: ignore[attr-defined]
from typing import Any

MAX_DEPTH = 24
MAX_VALUES = 2_000
MAX_ITEMS = 64
# Optional properties and a first array item are filled in while the instance is this shallow:
# it shows what a full answer looks like and still ends on recursive schemas.
FULL_DEPTH = 4
MAX_TEXT = 200

_FORMATS = {
    "date-time": "2026-01-01T00:00:00Z",
    "date": "2026-01-01",
    "time": "00:00:00Z",
    "duration": "P1D",
    "email": "user@example.com",
    "idn-email": "user@example.com",
    "hostname": "example.com",
    "idn-hostname": "example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "uri": "https://example.com/",
    "iri": "https://example.com/",
    "uri-reference": "https://example.com/",
    "url": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "regex": ".*",
    "json-pointer": "/",
}
_SMALLEST: dict[str, Any] = {
    "null": None,
    "boolean": False,
    "integer": 0,
    "number": 0,
    "string": "",
    "array": [],
    "object": {},
}
_OBJECT_WORDS = ("properties", "required", "additionalProperties", "minProperties")
_ARRAY_WORDS = ("items", "prefixItems", "minItems", "maxItems", "uniqueItems")
_STRING_WORDS = ("minLength", "maxLength", "pattern", "format")
_NUMBER_WORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


def schema_instance(schema: Any, text: str = "string") -> Any:
    """A value that `schema` accepts, the same every time; plain strings are `text`."""
    return _Walk(schema, text[:MAX_TEXT] or "string").value(schema, 0, 0)


class _Walk:
    """One instance being made: the document `$ref`s point into and what is left to spend."""

    def __init__(self, root: Any, text: str) -> None:
        self.root = root
        self.text = text
        self.left = MAX_VALUES

    def value(self, schema: Any, depth: int, variant: int) -> Any:
        """An instance of `schema`; `variant` > 0 asks for a different one where the schema
        allows (the items of a `uniqueItems` array)."""
        schema = self.flatten(schema, depth)
        if not isinstance(schema, dict):
            return None  # `true` accepts anything; `false` nothing
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][variant % len(schema["enum"])]
        kind = _kind(schema)
        self.left -= 1
        if depth > MAX_DEPTH or self.left < 0:
            return _SMALLEST.get(kind)
        if kind == "object":
            return self.object(schema, depth, variant)
        if kind == "array":
            return self.array(schema, depth, variant)
        if kind == "string":
            return self.string(schema, variant)
        if kind in ("integer", "number"):
            return _number(schema, kind == "integer", variant)
        if kind == "boolean":
            return variant % 2 == 1
        return None

    def flatten(self, schema: Any, depth: int) -> Any:
        """`schema` with its `$ref`, `allOf` and first `anyOf`/`oneOf` branch merged in, so
        that what is left describes one value directly."""
        for _ in range(MAX_DEPTH):
            if not isinstance(schema, dict):
                return schema
            if "$ref" in schema:
                rest = {k: v for k, v in schema.items() if k != "$ref"}
                schema = _merge(self.resolve(schema["$ref"]), rest)
            elif isinstance(schema.get("allOf"), list):
                rest = {k: v for k, v in schema.items() if k != "allOf"}
                parts = [self.flatten(part, depth + 1) for part in schema["allOf"][:MAX_ITEMS]]
                for part in parts:
                    rest = _merge(rest, part) if isinstance(part, dict) else rest
                schema = rest
            else:
                branches = schema.get("anyOf") or schema.get("oneOf")
                if not isinstance(branches, list) or not branches:
                    return schema
                rest = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
                schema = _merge(rest, self.flatten(branches[0], depth + 1))
        return schema

    def resolve(self, ref: Any) -> Any:
        """What a `#/…` JSON pointer names in the document; `{}` for anything else."""
        if not isinstance(ref, str) or not ref.startswith("#"):
            return {}
        target = self.root
        for token in ref[1:].split("/")[1:]:
            token = token.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and token in target:
                target = target[token]
            elif isinstance(target, list) and token.isdigit() and int(token) < len(target):
                target = target[int(token)]
            else:
                return {}
        return target

    def object(self, schema: dict[str, Any], depth: int, variant: int) -> dict[str, Any]:
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        listed = schema.get("required")
        required = [n for n in listed if isinstance(n, str)] if isinstance(listed, list) else []
        extra = schema.get("additionalProperties", True)
        result: dict[str, Any] = {}
        for name, sub in properties.items():
            if sub is not False and (name in required or depth < FULL_DEPTH):
                result[name] = self.value(sub, depth + 1, variant)
        for name in required:
            if name not in result:
                result[name] = self.value(extra if isinstance(extra, dict) else {}, depth + 1, 0)
        wanted = schema.get("minProperties")
        if isinstance(wanted, int) and extra is not False:
            for number in range(min(wanted, MAX_ITEMS) - len(result)):
                sub = extra if isinstance(extra, dict) else {}
                result[f"key{number}"] = self.value(sub, depth + 1, 0)
        return result

    def array(self, schema: dict[str, Any], depth: int, variant: int) -> list[Any]:
        prefix = schema.get("prefixItems")
        items = schema.get("items", {})
        if isinstance(items, list):  # drafts before 2020-12 wrote tuples this way
            prefix, items = items, schema.get("additionalItems", {})
        prefix = prefix if isinstance(prefix, list) else []
        least = _int(schema.get("minItems"), 0)
        count = max(least, 1 if depth < FULL_DEPTH else 0, min(len(prefix), 1))
        most = _int(schema.get("maxItems"), MAX_ITEMS)
        if items is False:
            most = min(most, len(prefix))
        count = min(count, most, MAX_ITEMS)
        unique = schema.get("uniqueItems") is True
        result = []
        for position in range(count):
            sub = prefix[position] if position < len(prefix) else items
            result.append(self.value(sub, depth + 1, variant + position if unique else variant))
        return result

    def string(self, schema: dict[str, Any], variant: int) -> str:
        pattern = schema.get("pattern")
        if isinstance(pattern, str):
            made = pattern_string(pattern)
            if made is not None:
                return made
        fmt = schema.get("format")
        value = _FORMATS.get(fmt, self.text) if isinstance(fmt, str) else self.text
        if variant:
            value = f"{value} {variant}"
        least = _int(schema.get("minLength"), 0)
        most = _int(schema.get("maxLength"), len(value))
        if variant and most < len(value):
            value = str(variant)  # still different from its siblings, if it fits at all
        value = value[:most]
        return value + "x" * min(max(0, least - len(value)), MAX_TEXT * 10)


def _kind(schema: dict[str, Any]) -> str:
    """The JSON type the instance is made as: the first non-null `type`, else the one its
    keywords describe."""
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if isinstance(k, str)]
        kind = next((k for k in kinds if k != "null"), "null" if kinds else None)
    if isinstance(kind, str) and kind in _SMALLEST:
        return kind
    for words, implied in (
        (_OBJECT_WORDS, "object"),
        (_ARRAY_WORDS, "array"),
        (_STRING_WORDS, "string"),
        (_NUMBER_WORDS, "number"),
    ):
        if any(word in schema for word in words):
            return implied
    return "null"


def _merge(base: Any, extra: Any) -> Any:
    """Two schemas' keywords as one: properties joined, required lists joined, other
    keywords of `extra` winning."""
    if not isinstance(base, dict) or not isinstance(extra, dict):
        return extra if isinstance(extra, dict) else base
    merged = {**base, **extra}
    if isinstance(base.get("properties"), dict) and isinstance(extra.get("properties"), dict):
        merged["properties"] = {**base["properties"], **extra["properties"]}
    if isinstance(base.get("required"), list) and isinstance(extra.get("required"), list):
        merged["required"] = base["required"] + [
            name for name in extra["required"] if name not in base["required"]
        ]
    return merged


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _bound(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if math.isfinite(value) else None


def _number(schema: dict[str, Any], integer: bool, variant: int) -> int | float:
    """The multiple of `multipleOf` (integer ones; else 1) nearest 0 within the schema's
    bounds, `variant` steps further where that still fits; a fraction only where no integer
    lies within the bounds of a `number`."""
    low, high = _bound(schema.get("minimum")), _bound(schema.get("maximum"))
    above, below = _bound(schema.get("exclusiveMinimum")), _bound(schema.get("exclusiveMaximum"))
    if schema.get("exclusiveMinimum") is True:  # draft 4: a flag on `minimum`
        above, low = low, None
    if schema.get("exclusiveMaximum") is True:
        below, high = high, None
    least = max(
        math.ceil(low) if low is not None else -math.inf,
        math.floor(above) + 1 if above is not None else -math.inf,
    )
    most = min(
        math.floor(high) if high is not None else math.inf,
        math.ceil(below) - 1 if below is not None else math.inf,
    )
    step = _bound(schema.get("multipleOf"))
    step = int(step) if step and step == int(step) and step >= 1 else 1
    if least <= 0 <= most:
        start = 0
    elif least > 0:
        start = -(-least // step) * step  # integer division: bounds may be huge
    else:
        start = (most // step) * step
    candidate = start + variant * step
    if candidate > most:
        candidate = start
    if least <= candidate <= most or integer:
        return candidate  # an integer that is out of bounds: no integer fits the schema
    lower = low if low is not None else above
    upper = high if high is not None else below
    if lower is not None and upper is not None:
        return (lower + upper) / 2
    return lower + 0.5 if lower is not None else upper - 0.5  # type: ignore[operator]


def pattern_string(pattern: str) -> str | None:
    """The shortest string `pattern` is built to match (literals, classes, repeats at their
    minimum, first alternatives), checked with `re.search` as JSON Schema applies patterns;
    None when the pattern is beyond that (back-references, negated classes)."""
    try:
        made = _emit(sre.parse(pattern), 0)
        return made if re.search(pattern, made) else None
    except (re.error, RecursionError, _Unsupported, ValueError, OverflowError):
        return None


class _Unsupported(Exception):
    pass


_CATEGORY = {
    sre.CATEGORY_DIGIT: "0",
    sre.CATEGORY_WORD: "a",
    sre.CATEGORY_SPACE: " ",
    sre.CATEGORY_NOT_DIGIT: "a",
    sre.CATEGORY_NOT_WORD: " ",
    sre.CATEGORY_NOT_SPACE: "a",
}


def _emit(items: Any, depth: int) -> str:
    if depth > MAX_DEPTH:
        raise _Unsupported
    out = []
    for op, arg in items:
        if op is sre.LITERAL:
            out.append(chr(arg))
        elif op is sre.NOT_LITERAL:
            out.append("a" if arg != ord("a") else "b")
        elif op is sre.ANY:
            out.append("a")
        elif op is sre.IN:
            out.append(_class_char(arg))
        elif op is sre.CATEGORY:
            out.append(_CATEGORY.get(arg, "a"))
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
            least, _, sub = arg
            if least > MAX_TEXT:
                raise _Unsupported
            out.append(_emit(sub, depth + 1) * least)
        elif op is sre.SUBPATTERN:
            out.append(_emit(arg[-1], depth + 1))
        elif op is sre.ATOMIC_GROUP:
            out.append(_emit(arg, depth + 1))
        elif op is sre.BRANCH:
            out.append(_emit(arg[1][0], depth + 1))
        elif op in (sre.AT, sre.ASSERT, sre.ASSERT_NOT):
            continue  # anchors and lookarounds match no text; the final search checks them
        else:
            raise _Unsupported
    return "".join(out)


def _class_char(members: Any) -> str:
    for op, arg in members:
        if op is sre.NEGATE:
            raise _Unsupported
        if op is sre.LITERAL:
            return chr(arg)
        if op is sre.RANGE:
            return chr(arg[0])
        if op is sre.CATEGORY:
            return _CATEGORY.get(arg, "a")
    raise _Unsupported
