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

# After strings are cut out, only brackets matter: opening ones step +1, closing ones -1.
_OTHER_BYTES = bytes(range(256)).translate(None, b"[]{}")
_STEPS = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


class NestingError(msgspec.DecodeError):
    """JSON nested deeper than MAX_NESTING. A DecodeError, so that every place that already
    answers malformed JSON answers this the same way."""


def _outside_strings(data: bytes) -> bytes:
    # Escapes occur only inside strings: drop escaped backslashes first, then escaped quotes;
    # what is left between an even and an odd quote is a string's content. All in C, linear.
    unescaped = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    return b"".join(unescaped.split(b'"')[::2])


def nesting_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in `data` (0 for a scalar), counted outside
    strings. Malformed JSON may count deeper than it is; the decoder refuses it anyway."""
    brackets = _outside_strings(data).translate(None, _OTHER_BYTES)
    return max(accumulate(map(_STEPS.__getitem__, brackets)), default=0)


def bounded(data: JSONText, limit: int = MAX_NESTING) -> JSONText:
    """`data` itself, or NestingError if it nests deeper than `limit`. Costs ~1 µs for a
    typical 1 KB body: fewer brackets than `limit` in all (the usual case) needs no scan."""
    raw = data.encode(errors="surrogatepass") if isinstance(data, str) else data
    if raw.count(b"[") + raw.count(b"{") > limit and nesting_depth(raw) > limit:
        raise NestingError(f"JSON is nested more than {limit} levels deep")
    return data
