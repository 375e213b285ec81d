"""The PII check's NER engine (issue 15), on a spaCy pipeline the test makes and installs in a
folder (an entity ruler that knows two names and a city): names and places found beside the
pattern recognizers' findings; a pipeline that is not installed is a config error, never a
download."""

from __future__ import annotations

from pathlib import Path

import pytest
import spacy

from node.config import ConfigError, PiiCheck, parse_config
from node.gateway.guardrails.findings import Replacer, literals_of
from node.gateway.guardrails.pii import Pii


def _pipeline(folder: Path) -> Path:
    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("entity_ruler")
    ruler.add_patterns(  # type: ignore[attr-defined]
        [
            {"label": "PERSON", "pattern": [{"LOWER": "jane"}, {"LOWER": "doe"}]},
            {"label": "PERSON", "pattern": "Ahmed Khan"},
            {"label": "GPE", "pattern": "Lisbon"},
        ]
    )
    nlp.to_disk(folder)
    return folder


def test_names_and_places_are_found_with_an_installed_pipeline(tmp_path: Path) -> None:
    model = _pipeline(tmp_path / "ner")
    check = PiiCheck(
        ner_model=str(model), entities=["PERSON", "LOCATION", "EMAIL_ADDRESS"], action="redact"
    )
    pii = Pii(check)
    text = "Jane Doe met Ahmed Khan in Lisbon; write to jane@example.com"
    spans = pii.find(text)
    assert {span.kind for span in spans} == {"PERSON", "LOCATION", "EMAIL_ADDRESS"}
    redacted = Replacer(literals_of(text, spans))(text)
    assert redacted == (
        "[PERSON_REDACTED] met [PERSON_REDACTED] in [LOCATION_REDACTED]; write to [EMAIL_REDACTED]"
    )


def test_a_pipeline_not_installed_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ner_model 'en_core_web_nope' is not installed"):
        Pii(PiiCheck(ner_model="en_core_web_nope", entities=["PERSON"]))


def test_ner_entities_need_a_ner_model() -> None:
    text = b"""
[node]
name = "n"
[guardrails.profiles.p]
checks = [{ kind = "pii", entities = ["PERSON"] }]
"""
    with pytest.raises(ConfigError, match=r"unknown entities \['PERSON'\].*with ner_model"):
        parse_config(text)
