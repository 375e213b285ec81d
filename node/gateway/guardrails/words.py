"""Banned words and topics: whole words or phrases, case-blind, after Unicode folding."""

from __future__ import annotations

import re

from node.config import BannedCheck
from node.gateway.guardrails.findings import Span, folded


class BannedWords:
    def __init__(self, check: BannedCheck) -> None:
        words = sorted({folded(word) for word in check.words}, key=len, reverse=True)
        alternation = "|".join(re.escape(word) for word in words)
        # Found in the folded text (so full-width letters and `bo\u200bmb` count), replaced in the
        # original (case-blind): a disguised word is found and refused, not always redacted.
        self._folded = re.compile(rf"(?<!\w)(?:{alternation})(?!\w)")
        self._original = re.compile(rf"(?<!\w)(?:{alternation})(?!\w)", re.IGNORECASE)

    def find(self, text: str) -> list[Span]:
        if self._folded.search(folded(text)) is None:
            return []
        spans = [Span("BANNED", m.start(), m.end()) for m in self._original.finditer(text)]
        return spans or [Span("BANNED", 0, 0)]
