"""What a check finds, and how what it found is replaced in a text."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable

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
    """One check's verdict on a request or an answer: what kinds of thing it found and how
    many of each (`counts[i]` of `kinds[i]`), never the things themselves."""

    check: str
    action: str
    kinds: tuple[str, ...]
    counts: tuple[int, ...] = ()

    @classmethod
    def of(cls, check: str, action: str, spans: Iterable[Span]) -> Finding:
        counted = Counter(span.kind for span in spans)
        kinds = tuple(sorted(counted))
        return cls(check, action, kinds, tuple(counted[kind] for kind in kinds))


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


class Redaction:
    """What the guardrails replaced in a request, in order (the checks' literals, then a
    webhook's texts): applied to what the node keeps of it (its interaction log, a stored
    Responses conversation), so that nothing kept holds what no upstream was sent."""

    def __init__(self) -> None:
        self.steps: list[Callable[[str], str]] = []

    def __bool__(self) -> bool:
        return bool(self.steps)

    def add(self, replace: Callable[[str], str]) -> None:
        self.steps.append(replace)

    def __call__(self, text: str) -> str:
        for step in self.steps:
            text = step(text)
        return text


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
