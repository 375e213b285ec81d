"""PII through Microsoft Presidio's analyzer, offline: its pattern recognizers (emails, phone
numbers, credit cards checked by Luhn, IBANs checked by their mod-97, IP addresses) over a
blank spaCy pipeline, which tokenizes (for Presidio's context words) but needs no model.

Imported only when a profile has a `pii` check: Presidio and spaCy take a second to import.
"""

from __future__ import annotations

from typing import Any

from node.config import PiiCheck
from node.gateway.guardrails.findings import Span


def _blank_engine() -> Any:
    """A Presidio NLP engine over `spacy.blank("en")`: tokens, lemmas as the words themselves,
    no named entities (Presidio's SpacyNlpEngine would download a model)."""
    import spacy
    from presidio_analyzer.nlp_engine import NlpArtifacts, NlpEngine

    class BlankNlpEngine(NlpEngine):
        def __init__(self) -> None:
            self.nlp = spacy.blank("en")

        def load(self) -> None:
            pass

        def is_loaded(self) -> bool:
            return True

        def process_text(self, text: str, language: str) -> NlpArtifacts:
            doc = self.nlp(text)
            return NlpArtifacts(
                entities=[],
                tokens=doc,
                tokens_indices=[token.idx for token in doc],
                lemmas=[token.lower_ for token in doc],
                nlp_engine=self,
                language=language,
            )

        def process_batch(self, texts: Any, language: str, **kwargs: Any) -> Any:
            for text in texts:
                yield text, self.process_text(text, language)

        def is_stopword(self, word: str, language: str) -> bool:
            return self.nlp.vocab[word].is_stop

        def is_punct(self, word: str, language: str) -> bool:
            return self.nlp.vocab[word].is_punct

        def get_supported_entities(self) -> list[str]:
            return []

        def get_supported_languages(self) -> list[str]:
            return ["en"]

    return BlankNlpEngine()


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
    return AnalyzerEngine(registry=registry, nlp_engine=_blank_engine(), supported_languages=["en"])


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
