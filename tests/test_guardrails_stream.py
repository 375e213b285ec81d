"""The hold-back window of streamed output checks (node/gateway/guardrails/stream.py): PII
put at random places in random text and split at random chunk boundaries is redacted as it
would be in the whole text, and never leaves in part; with Presidio's real recognizers."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncGenerator
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.events import Finish, TextDelta
from node.config import PiiCheck, SecretsCheck
from node.gateway.guardrails.checks import Built
from node.gateway.guardrails.findings import Finding
from node.gateway.guardrails.pii import Pii
from node.gateway.guardrails.secrets import Secrets
from node.gateway.guardrails.stream import HoldBack, guarded, redact_spans

WINDOW = 64
SECRETS = {
    "jane.doe@example.com": "[EMAIL_REDACTED]",
    "4111 1111 1111 1111": "[CREDIT_CARD_REDACTED]",
    "DE89 3704 0044 0532 0130 00": "[IBAN_REDACTED]",
    "10.20.30.40": "[IP_ADDRESS_REDACTED]",
    "AKIAIOSFODNN7EXAMPLE": "[SECRET_REDACTED]",
}
WORDS = st.sampled_from(["the", "answer", "is", "here,", "and", "so", "on.", "we", "mail", "x"])


@functools.cache
def checks() -> list[Built]:
    pii = Pii(PiiCheck(action="redact", output=True))
    secrets = Secrets(SecretsCheck(action="redact", output=True))
    return [
        Built("pii", "redact", pii, None, True, True),
        Built("secrets", "redact", secrets, None, True, True),
    ]


def whole(text: str) -> str:
    spans = [span for check in checks() for span in check.detector.find(text)]  # type: ignore[union-attr]
    return redact_spans(text, spans)


@st.composite
def texts_in_chunks(draw: Any) -> tuple[str, str, list[str]]:
    before = draw(st.lists(WORDS, max_size=30))
    after = draw(st.lists(WORDS, max_size=30))
    secret = draw(st.sampled_from(sorted(SECRETS)))
    text = " ".join([*before, secret, *after])
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=20)))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    return text, secret, [chunk for chunk in chunks if chunk]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts_in_chunks())
def test_split_pii_is_redacted_as_in_the_whole_text(case: tuple[str, str, list[str]]) -> None:
    text, secret, chunks = case
    seen: list[Finding] = []
    hold = HoldBack(checks(), WINDOW, seen.append)
    sent = "".join(hold.feed(chunk) for chunk in chunks) + hold.flush()
    assert secret not in sent
    assert SECRETS[secret] in sent
    assert sent == whole(text)
    assert seen and all(finding.action == "redact" for finding in seen)


async def _events(chunks: list[str]) -> AsyncGenerator[Any, None]:
    for chunk in chunks:
        yield TextDelta(chunk)
    yield Finish("stop")


@settings(max_examples=40, deadline=None)
@given(texts_in_chunks())
def test_the_stream_filter_sends_the_text_before_the_finish(
    case: tuple[str, str, list[str]],
) -> None:
    text, secret, chunks = case

    async def run() -> list[Any]:
        return [item async for item in guarded(_events(chunks), checks(), WINDOW, lambda _: None)]

    items = asyncio.run(run())
    assert isinstance(items[-1], Finish)
    sent = "".join(item.text for item in items if isinstance(item, TextDelta))
    assert sent == whole(text) and secret not in sent


def test_nothing_is_held_past_the_window_without_findings() -> None:
    hold = HoldBack(checks(), WINDOW, lambda _: None)
    assert hold.feed("a" * (WINDOW + 1)) == ""  # less than a step past the window: held
    out = hold.feed("a" * WINDOW)
    assert out == "a" * (WINDOW + 1) and len(hold.pending) == WINDOW
