"""`POST /v1/moderations` from the node's own checks: each text assessed by every check of
the caller's profile (whatever its action; webhooks are not asked), in OpenAI's moderation
shape with the node's checks as the categories (a check's name, its score 0 or 1, the
injection check's its score). A caller with no profile is assessed by the injection check.
With moderation checks in the profile, their deployments' categories and scores are added to
each result (`with_deployments`); one that fails is left out (`on_error = "allow"`) or
fails the request (`ModerationFailed`)."""

from __future__ import annotations

import secrets as random

import msgspec

from node.gateway.guardrails.checks import Built, Profile
from node.gateway.guardrails.injection import injection_score
from node.gateway.guardrails.moderator import Assessment, ModerationFailed

MODEL = "aihub-guardrails"


class ModerationResult(msgspec.Struct):
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[str]]


class Moderation(msgspec.Struct):
    id: str
    model: str
    results: list[ModerationResult]


def _assess(check: Built, text: str) -> tuple[bool, float]:
    if check.max_chars is not None:
        found = len(text) > check.max_chars
    else:
        found = check.detector is not None and bool(check.detector.find(text))
    if check.kind == "injection":
        return found, round(injection_score(text), 4)
    return found, 1.0 if found else 0.0


def moderate(profile: Profile | None, fallback: list[Built], texts: list[str]) -> Moderation:
    checks = [c for c in (profile.checks if profile else fallback) if not c.remote]
    results = []
    for text in texts:
        categories: dict[str, bool] = {}
        scores: dict[str, float] = {}
        for check in checks:
            found, score = _assess(check, text)
            categories[check.name] = categories.get(check.name, False) or found
            scores[check.name] = max(scores.get(check.name, 0.0), score)
        applied = {name: ["text"] for name in categories}
        results.append(ModerationResult(any(categories.values()), categories, scores, applied))
    return Moderation(f"modr-{random.token_hex(12)}", MODEL, results)


def _combine(result: ModerationResult, assessment: Assessment) -> None:
    for name in {*assessment.scores, *assessment.flagged}:
        found = name in assessment.flagged
        result.categories[name] = result.categories.get(name, False) or found
        score = assessment.scores.get(name, 1.0 if found else 0.0)
        result.category_scores[name] = max(result.category_scores.get(name, 0.0), score)
        result.category_applied_input_types[name] = ["text"]
    result.flagged = result.flagged or bool(assessment.flagged)


async def with_deployments(moderation: Moderation, profile: Profile, texts: list[str]) -> None:
    """The profile's moderation deployments asked about the texts, their answers added to
    the node's own (a `ModerationFailed` from one that fails closed)."""
    for check in profile.checks:
        if check.moderator is None or not check.input:
            continue
        try:
            assessed = await check.moderator.assess(texts)
        except ModerationFailed:
            if check.moderator.on_error == "allow":
                continue
            raise
        for result, assessment in zip(moderation.results, assessed, strict=True):
            _combine(result, assessment)
