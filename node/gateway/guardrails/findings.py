"""What a check finds, and how what it found is replaced in a text."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

import msgspec

# Characters that render as nothing but split words: stripped before words are matched, so
# that `ig\u200bnore` is still `ignore`.
_INVISIBLE = dict.fromkeys(
    [0x00AD, 0x034F, 0x061C, 0x180E, 0x200B, 0x200C, 0x200D, 0x2060, 0x2061, 0x2062, 0x2063, 0x2064]
)
_INVISIBLE[0xFEFF] = None


class Span(msgspec.Struct, frozen=True):
    """One thing found in one text: what it is (`EMAIL_ADDRESS`, `AWS Access Key`, …) and
    where (`text[start:end]`)."""

    kind: str
    start: int
    end: int


class Finding(msgspec.Struct, frozen=True):
    """One check's verdict on a request or an answer: what kinds of thing it found, never
    the things themselves."""

    check: str
    action: str
    kinds: tuple[str, ...]


def folded(text: str) -> str:
    """The text as words are matched in it: NFKC (full-width and ligature forms become plain
    letters), invisible characters removed, case folded. Lengths may change: matching only."""
    return unicodedata.normalize("NFKC", text).translate(_INVISIBLE).casefold()


class Replacer:
    """Replaces every found literal with its typed placeholder, in any string: the literals a
    check found in the texts it read are replaced wherever the request holds them (its typed
    form, the raw fields an OpenAI-compatible upstream is sent, a native request)."""

    def __init__(self, literals: dict[str, str]) -> None:
        self.literals = literals
        ordered = sorted(literals, key=len, reverse=True)  # the longest match wins
        self._pattern = re.compile("|".join(re.escape(literal) for literal in ordered))

    def __call__(self, text: str) -> str:
        if not self.literals:
            return text
        return self._pattern.sub(lambda match: self.literals[match.group()], text)


def placeholder(kind: str) -> str:
    """`[EMAIL_REDACTED]` for an email: what was there, not what it was."""
    label = _LABELS.get(kind, "SECRET")
    return f"[{label}_REDACTED]"


_LABELS = {
    "EMAIL_ADDRESS": "EMAIL",
    "PHONE_NUMBER": "PHONE",
    "CREDIT_CARD": "CREDIT_CARD",
    "IBAN_CODE": "IBAN",
    "IP_ADDRESS": "IP_ADDRESS",
    "BANNED": "BANNED",
    "PERSON": "PERSON",
    "LOCATION": "LOCATION",
    "ORGANIZATION": "ORGANIZATION",
    "NRP": "NRP",
    "DATE_TIME": "DATE_TIME",
}


def literals_of(text: str, spans: Iterable[Span]) -> dict[str, str]:
    return {text[span.start : span.end]: placeholder(span.kind) for span in spans}
