"""A bound on JSON nesting, checked before anything from outside is decoded.

msgspec recurses once per level of nesting and raises RecursionError (not a DecodeError) past
the interpreter's limit, so 2 KB of brackets would otherwise be a 500 on every JSON endpoint.
No JSON the node, its peers or OpenAI clients exchange comes near this depth (a signed record is
3 deep; a tool's JSON schema rarely 20).
"""

from __future__ import annotations

from itertools import accumulate
from typing import TypeVar

import msgspec

MAX_NESTING = 64

JSONText = TypeVar("JSONText", bytes, str)

# Outside strings only quotes and brackets matter, brackets all of one kind (depth counts).
_NOT_MARK = bytes(range(256)).translate(None, b'"[]{}')
_NOT_OPENING = bytes(range(256)).translate(None, b"[{")
_ONE_KIND = bytes.maketrans(b"[]{}", b"()()")
_STEPS = {ord("("): 1, ord(")"): -1}
# Most JSON is shallow: this many passes settle it; deeper or odd input is counted exactly.
_QUICK_PASSES = 16


class NestingError(msgspec.DecodeError):
    """JSON nested deeper than MAX_NESTING. A DecodeError, so that every place that already
    answers malformed JSON answers this the same way."""


def _brackets(data: bytes) -> bytes:
    """The brackets of `data` outside strings, as `(` and `)`; every step a pass in C."""
    # Escapes occur only in strings: with escaped backslashes, then escaped quotes gone,
    # every quote left opens or closes a string.
    if b"\\" in data:  # (memchr: most bodies with no escape skip two passes)
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Two adjacent quotes (a string with no bracket in it, once the rest is dropped) go:
    # that changes no bracket's side of a string, and leaves few parts to split.
    marks = data.translate(_ONE_KIND, _NOT_MARK).replace(b'""', b"")
    return b"".join(marks.split(b'"')[::2])


def _depth(brackets: bytes) -> int:
    return max(accumulate(map(_STEPS.__getitem__, brackets)), default=0)


def nesting_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in `data` (0 for a scalar), counted outside
    strings. Malformed JSON may count deeper than it is; the decoder refuses it anyway."""
    return _depth(_brackets(data))


def deeper_than(data: bytes, limit: int) -> bool:
    """nesting_depth(data) > limit, faster for usual JSON: each pass drops the innermost pairs
    of brackets, so well-formed JSON is empty after as many passes as it is deep."""
    brackets = _brackets(data)
    rest = brackets
    for _ in range(min(limit, _QUICK_PASSES)):
        inner = rest.replace(b"()", b"")
        # A pass that drops little (long chains: a crafted body) would take many more:
        # count exactly instead.
        shrunk = len(inner) * 8 < len(rest) * 7
        rest = inner
        if not shrunk:
            break
    # Every opening bracket closed within the passes: no deeper than that.
    return b"(" in rest and _depth(brackets) > limit


def bounded(data: JSONText, limit: int = MAX_NESTING) -> JSONText:
    """`data` itself, or NestingError if it nests deeper than `limit`. Costs ~1 µs for a
    typical 1 KB chat body (fewer opening brackets than `limit`: no scan); a body with more is
    scanned at ~5 ns a byte (7 KB of 50 tools: ~40 µs, about what msgspec takes to decode
    it), 4 MB crafted to be slow in under a second."""
    raw = data.encode(errors="surrogatepass") if isinstance(data, str) else data
    # Deeper than `limit` needs more than `limit` opening brackets: one pass in C counts them.
    if len(raw.translate(None, _NOT_OPENING)) > limit and deeper_than(raw, limit):
        raise NestingError(f"JSON is nested more than {limit} levels deep")
    return data
