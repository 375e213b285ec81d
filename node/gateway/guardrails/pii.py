"""PII through Microsoft Presidio's analyzer, offline: its pattern recognizers (emails, phone
numbers, credit cards checked by Luhn, IBANs checked by their mod-97, IP addresses) with an
NLP engine that needs no model (and reads no tokens: see `_analyzer`).

Two things keep its cost down on ordinary text, neither deciding what is found: a recognizer
is not run on a text that lacks what every match of it holds (`_may_hold`), and libphonenumber's
matcher, the dearest part, reads only the stretches around runs of digits
(`_phone_windows`; `tests/test_guardrails_phones.py` holds it to Presidio's own result).

With `ner_model` (an installed spaCy pipeline), Presidio's spaCy recognizer adds names,
places and organisations. Imported only when a profile has a `pii` check: Presidio takes a
second to import.
"""

from __future__ import annotations

import re
from typing import Any

from node.config import ConfigError, PiiCheck
from node.gateway.guardrails.findings import Span


def _offline_email() -> Any:
    """Presidio's email recognizer with its domain check on tldextract's bundled suffix list:
    the default extractor fetches the list from the network first."""
    import tldextract
    from presidio_analyzer.predefined_recognizers import EmailRecognizer

    extract = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return extract(pattern_text).fqdn != ""

    return OfflineEmailRecognizer()


# Where a phone number may be: six digits or more, each from the last by at most four
# characters that are neither letters nor digits (or an `x`, which libphonenumber's matcher
# also takes between digits). A superset of the matcher's own candidates, which never hold a
# letter: it is what the matcher is run on (with some text either side), not the whole text.
_PHONE_RUN = re.compile(r"\d(?:[\WxX_]{0,4}\d){5,}")
# Text kept before a run (a `+`, a bracket, what tells the matcher a number starts there) and
# after it (an extension: "ext. 1234", "extension 1234567", "#12"), never ending inside a word.
_BEFORE, _AFTER, _WORD_MAX = 8, 32, 32


def _phone_windows(text: str) -> list[tuple[int, int]]:
    """The stretches of `text` around its digit runs, merged where they overlap."""
    windows: list[tuple[int, int]] = []
    for run in _PHONE_RUN.finditer(text):
        start = max(0, run.start() - _BEFORE)
        while start > 0 and text[start - 1].isalnum() and run.start() - start < _BEFORE + _WORD_MAX:
            start -= 1
        end = min(len(text), run.end() + _AFTER)
        while end < len(text) and text[end].isalnum() and end - run.end() < _AFTER + _WORD_MAX:
            end += 1
        if windows and start <= windows[-1][1]:
            windows[-1] = (windows[-1][0], end)
        else:
            windows.append((start, end))
    return windows


def _windowed_phones(regions: list[str]) -> Any:
    """Presidio's phone recognizer run only on the stretches that may hold a number: on prose
    with figures in it ("4.2 million in Q3 2026, up 12%") libphonenumber's matcher tries
    every group of digits, ~5 ms a region per 1 KB, where no group is long enough to be one."""
    from presidio_analyzer.predefined_recognizers import PhoneRecognizer

    class WindowedPhoneRecognizer(PhoneRecognizer):
        def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None) -> Any:
            results = []
            for start, end in _phone_windows(text):
                for result in super().analyze(text[start:end], entities, nlp_artifacts):
                    result.start += start
                    result.end += start
                    results.append(result)
            return results

    return WindowedPhoneRecognizer(supported_regions=regions)


def _ner_engine(model: str) -> Any:
    """Presidio's spaCy engine over an installed pipeline (never a download: Presidio's own
    engine downloads a model it does not find)."""
    from pathlib import Path

    import spacy
    from presidio_analyzer.nlp_engine import SpacyNlpEngine

    if not (spacy.util.is_package(model) or Path(model).exists()):
        raise ConfigError(
            f"guardrails: the pii check's ner_model {model!r} is not installed "
            "(a spaCy pipeline's package name or folder; the node downloads none)"
        )
    engine = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": model}])
    engine.load()
    return engine


def _analyzer(regions: list[str], ner_model: str) -> Any:
    """Presidio's analyzer with its pattern recognizers and, with `ner_model`, its spaCy
    recognizer. Without one, Presidio's no-op NLP engine: no model, no tokens (so no context
    words raise a score: a finding scores by its pattern and validator, a Luhn-valid card or
    a checksum-valid IBAN 1.0), at half the cost of tokenizing with a blank spaCy pipeline."""
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import NoOpNlpEngine
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        IbanRecognizer,
        IpRecognizer,
    )

    no_op = [{"lang_code": "en", "model_name": "none"}]
    engine = _ner_engine(ner_model) if ner_model else NoOpNlpEngine(models=no_op)
    registry = RecognizerRegistry(supported_languages=["en"])
    registry.add_recognizer(_offline_email())
    # Each region is a pass of libphonenumber's matcher over the text (most of the cost):
    # numbers in international form (+49 …) are found whatever the regions.
    registry.add_recognizer(_windowed_phones(regions))
    for recognizer in (CreditCardRecognizer, IbanRecognizer, IpRecognizer):
        registry.add_recognizer(recognizer())
    if ner_model:
        registry.add_nlp_recognizer(nlp_engine=engine)
    return AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=["en"])


# What each pattern recognizer's matches cannot do without (`_may_hold`): a text that lacks
# it is not given to that recognizer, and a text that feeds none of them is not given to
# Presidio at all (whose own pass costs ~90 µs on 1 KB). Each is a superset of what its
# recognizer's patterns match (`\d` is any Unicode digit; `tests/test_guardrails_gates.py`
# holds each to its patterns, and the check to Presidio's result on the whole text), and
# most start with a literal, which the regex engine searches for at C speed (one that starts
# with a class costs ~20 ns a character): ordinary prose with figures in it ("4.2 million in
# Q3 2026, up 12%") feeds none, where the IP recognizer alone took ~285 µs on 1 KB of it.
_IPV4 = re.compile(r"\.\d+\.")  # within its four dotted numbers
_IPV6 = re.compile(r":[0-9A-Fa-f:]")  # every form has `::` or a colon before a hex digit
_IBAN = re.compile(r"[A-Z]{2}\d{2}")  # a country code and check digits (case-sensitive)
# Four digits, then at least three more (the shortest card its pattern takes): a digit run
# the phone matcher's (`_PHONE_RUN`) holds too, so it is looked for only where that is found.
_CARD = re.compile(r"\d{4}[- ]?\d{3}")


def _may_hold(text: str) -> set[str]:
    """The pattern recognizers' entities that the text may hold."""
    may = set()
    if "@" in text:
        may.add("EMAIL_ADDRESS")
    if _IPV4.search(text) is not None or _IPV6.search(text) is not None:
        may.add("IP_ADDRESS")
    if _IBAN.search(text) is not None:
        may.add("IBAN_CODE")
    if _PHONE_RUN.search(text) is not None:  # what the windowed matcher reads: none, no number
        may.add("PHONE_NUMBER")
        if _CARD.search(text) is not None:
            may.add("CREDIT_CARD")
    return may


_PATTERNED = frozenset({"EMAIL_ADDRESS", "IP_ADDRESS", "IBAN_CODE", "PHONE_NUMBER", "CREDIT_CARD"})


class Pii:
    """One analyzer per check (its recognizers compiled once, at start)."""

    def __init__(self, check: PiiCheck) -> None:
        self.entities = list(check.entities)
        self.min_score = check.min_score
        self._engine = _analyzer(check.phone_regions, check.ner_model)

    def _wanted(self, text: str) -> list[str]:
        """The entities a text may hold (an NER entity always may)."""
        may = _may_hold(text)
        return [entity for entity in self.entities if entity not in _PATTERNED or entity in may]

    def find(self, text: str) -> list[Span]:
        if not text.strip():
            return []
        entities = self._wanted(text)
        if not entities:
            return []
        results = self._engine.analyze(
            text=text, language="en", entities=entities, score_threshold=self.min_score
        )
        return [Span(r.entity_type, r.start, r.end) for r in results]
