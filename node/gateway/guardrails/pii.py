"""PII through Microsoft Presidio's analyzer, offline: its pattern recognizers (emails, phone
numbers, credit cards checked by Luhn, IBANs checked by their mod-97, IP addresses) with an
NLP engine that needs no model (and reads no tokens: see `_patterns_only_engine`).

Imported only when a profile has a `pii` check: Presidio and spaCy take a second to import.
"""

from __future__ import annotations

from typing import Any

from node.config import PiiCheck
from node.gateway.guardrails.findings import Span


def _patterns_only_engine() -> Any:
    """A Presidio NLP engine that reads nothing: no tokens, no named entities. Presidio's
    SpacyNlpEngine needs a downloaded model, and the tokens of a blank spaCy pipeline would
    only serve its context words (a score raised near "email" or "phone"), at about 60 % of
    the check's cost on a 1 KB prompt; so a finding's score is its pattern's and validator's
    (a Luhn-valid card, a checksum-valid IBAN: 1.0)."""
    from presidio_analyzer.nlp_engine import NlpArtifacts, NlpEngine

    class PatternsOnlyNlpEngine(NlpEngine):
        def load(self) -> None:
            pass

        def is_loaded(self) -> bool:
            return True

        def process_text(self, text: str, language: str) -> NlpArtifacts:
            return NlpArtifacts(
                entities=[],
                tokens=[],  # type: ignore[arg-type]
                tokens_indices=[],
                lemmas=[],
                nlp_engine=self,
                language=language,
            )

        def process_batch(self, texts: Any, language: str, **kwargs: Any) -> Any:
            for text in texts:
                yield text, self.process_text(text, language)

        def is_stopword(self, word: str, language: str) -> bool:
            return False

        def is_punct(self, word: str, language: str) -> bool:
            return False

        def get_supported_entities(self) -> list[str]:
            return []

        def get_supported_languages(self) -> list[str]:
            return ["en"]

    return PatternsOnlyNlpEngine()


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


def _analyzer(regions: list[str]) -> Any:
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
    )

    registry = RecognizerRegistry(supported_languages=["en"])
    registry.add_recognizer(_offline_email())
    # Each region is a pass of libphonenumber's matcher over the text (most of the cost):
    # numbers in international form (+49 …) are found whatever the regions.
    registry.add_recognizer(PhoneRecognizer(supported_regions=regions))
    for recognizer in (CreditCardRecognizer, IbanRecognizer, IpRecognizer):
        registry.add_recognizer(recognizer())
    return AnalyzerEngine(
        registry=registry, nlp_engine=_patterns_only_engine(), supported_languages=["en"]
    )


class Pii:
    """One analyzer per check (its recognizers compiled once, at start)."""

    def __init__(self, check: PiiCheck) -> None:
        self.entities = list(check.entities)
        self.min_score = check.min_score
        self._engine = _analyzer(check.phone_regions)

    def find(self, text: str) -> list[Span]:
        if not text.strip():
            return []
        results = self._engine.analyze(
            text=text, language="en", entities=self.entities, score_threshold=self.min_score
        )
        return [Span(r.entity_type, r.start, r.end) for r in results]
