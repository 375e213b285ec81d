"""Prompt injection and jailbreak patterns, scored.

Hand-written: the kept libraries for this (LLM Guard's, Rebuff, NeMo Guardrails' jailbreak
heuristics) score with a transformer model or an external service, neither of which a node
has offline. These are the phrasings those projects' datasets are full of; each pattern
weighs how sure it alone makes us, and a text's score is the chance that at least one is
right (1 - Π(1 - w)), compared with the check's threshold.
"""

from __future__ import annotations

import re

from node.config import InjectionCheck
from node.gateway.guardrails.findings import Span, folded

# (weight, the words one of which each match holds, the pattern). A pattern is searched for
# only in a text that holds one of its words (a substring search, ~100 times cheaper than the
# pattern's scan, which starts with a `\b` that no literal-prefix search skips): ordinary
# prose holds few of them. `tests/test_guardrails_gates.py` holds each pattern to its words.
_PATTERNS: list[tuple[float, tuple[str, ...], str]] = [
    (
        0.6,
        ("ignore", "disregard", "forget", "override"),
        r"\b(ignore|disregard|forget|override)\b.{0,40}\b(previous|prior|above|earlier|all|"
        r"your|the)\b.{0,30}\b(instructions?|prompts?|rules|directions|guidelines|context)\b",
    ),
    (
        0.5,
        ("reveal", "show", "print", "repeat", "output", "leak", "tell me"),
        r"\b(reveal|show|print|repeat|output|leak|tell me)\b.{0,40}\b(system|hidden|initial|"
        r"original|secret)\s+(prompt|instructions?|message)\b",
    ),
    (
        0.5,
        ("you are ",),
        r"\byou are (now )?(dan|dude|stan|aim|evil|jailbroken|unfiltered|unrestricted)\b",
    ),
    (
        0.5,
        ("do anything now", "developer mode", "jailbreak", "god mode"),
        r"\b(do anything now|developer mode|jailbreak(ed)?|god mode)\b",
    ),
    (
        0.3,
        ("pretend", "act", "behave", "roleplay"),
        r"\b(pretend|act|behave|roleplay)\b.{0,30}\b(no|without)\b.{0,20}\b(restrictions|"
        r"rules|limits|filters|guidelines|censorship)\b",
    ),
    (0.3, ("new ",), r"\bnew (system )?instructions?\s*:"),
    (
        0.25,
        ("<", "[/inst]", "[inst]"),
        r"</?(system|im_start|im_end)>|<\|im_(start|end)\|>|\[/?inst\]",
    ),
    (
        0.2,
        ("bypass", "disable", "turn off"),
        r"\b(bypass|disable|turn off)\b.{0,30}\b(safety|filters?|guardrails?|moderation)\b",
    ),
]
_COMPILED = [
    (weight, words, re.compile(pattern, re.DOTALL)) for weight, words, pattern in _PATTERNS
]


def injection_score(text: str) -> float:
    """How likely the text tries to take over the model's instructions, 0 to 1."""
    text = folded(text)
    unlikely = 1.0
    for weight, words, pattern in _COMPILED:
        if any(word in text for word in words) and pattern.search(text) is not None:
            unlikely *= 1 - weight
    return 1 - unlikely


class Injection:
    def __init__(self, check: InjectionCheck) -> None:
        self.threshold = check.threshold

    def find(self, text: str) -> list[Span]:
        return [Span("PROMPT_INJECTION", 0, 0)] if injection_score(text) >= self.threshold else []
