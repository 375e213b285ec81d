"""The PII check's phone recognizer runs libphonenumber's matcher only around runs of digits
(`node/gateway/guardrails/pii.py`): on any text, hypothesis's or business prose with figures,
it finds exactly what Presidio's own phone recognizer finds on the whole text."""

from __future__ import annotations

import functools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.gateway.guardrails.pii import _windowed_phones

REGIONS = ["US", "GB"]
PHONES = [
    "(202) 555-0143",
    "202-555-0143",
    "202.555.0143",
    "+1 202 555 0143",
    "+1-202-555-0143",
    "020 7946 0958",
    "+44 20 7946 0958",
    "+44 (0)20 7946 0958",
    "+49 30 901820",
    "+33 1 42 68 53 00",
    "07700 900123",
    "1-800-555-0199",
    "+1 202 555 0143 x123",
    "202-555-0143 ext. 12345",
    "+44 20 7946 0958 extension 1234567",
    "\uff12\uff10\uff12\uff0d\uff15\uff15\uff15\uff0d\uff10\uff11\uff14\uff13",  # full-width
]
WORDS = [
    "revenue",
    "was",
    "4.2",
    "million",
    "in",
    "Q3",
    "2026,",
    "up",
    "12%",
    "on",
    "3.75",
    "call",
    "me",
    "at",
    "or",
    "(tel)",
    "ext.",
    "2025",
    "10:30",
    "#",
    "-",
    "/",
    "·",
    "and",
]


@functools.cache
def recognizers() -> tuple[Any, Any]:
    from presidio_analyzer.predefined_recognizers import PhoneRecognizer

    return _windowed_phones(REGIONS), PhoneRecognizer(supported_regions=REGIONS)


def found(recognizer: Any, text: str) -> set[tuple[int, int]]:
    return {(r.start, r.end) for r in recognizer.analyze(text, ["PHONE_NUMBER"])}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parts=st.lists(
        st.one_of(
            st.sampled_from(WORDS), st.sampled_from(PHONES), st.from_regex(r"[0-9 ()+.-]{1,16}")
        ),
        max_size=30,
    ),
    glue=st.sampled_from([" ", "", "\n", ", ", " - "]),
)
def test_the_windowed_matcher_finds_what_the_whole_text_matcher_finds(
    parts: list[str], glue: str
) -> None:
    text = glue.join(parts)
    windowed, whole = recognizers()
    assert found(windowed, text) == found(whole, text)


def test_every_sample_is_found_in_prose() -> None:
    windowed, whole = recognizers()
    for phone in PHONES:
        text = f"Revenue was 4.2 million in Q3 2026; call {phone} before 10:30 on the 12th."
        assert found(windowed, text) == found(whole, text), phone
