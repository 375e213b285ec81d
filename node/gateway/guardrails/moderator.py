"""A moderation deployment: texts sent to a `/v1/moderations`-compatible upstream (OpenAI's
wire format), what it flags read back.

    → POST {base_url}/moderations  {"model": "omni-moderation-latest", "input": ["…", …]}
    ← {"id": "modr-…", "model": "…", "results": [{"flagged": true,
         "categories": {"harassment": true, …}, "category_scores": {"harassment": 0.97, …}}]}

One result per text sent. An answer that does not arrive within the check's `timeout` (the
whole exchange, not each read), a status other than 200, or a body that is not this (more than
1 MiB, not JSON, the wrong number of results, a category name that is not a short plain word)
is a failure, which the check's `on_error` turns into allow (fail open) or block (closed).
"""

from __future__ import annotations

import logging
import re

import anyio
import httpx
import msgspec

from adapters.types import Upstream
from node.config import ModerationCheck
from node.gateway.guardrails.exchange import ServiceFailed, post_bounded

log = logging.getLogger("aihub.guardrails")

# OpenAI's category names (`self-harm/intent`, `violence/graphic`): what else a deployment
# names a category is not shown to anyone.
_CATEGORY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_/.-]{0,63}")
_MAX_CATEGORIES = 64
_DEFAULT_URL = "https://api.openai.com/v1"


class ModerationFailed(Exception):
    """The deployment did not answer, or answered what is not a moderation."""


class _Result(msgspec.Struct):
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float] = {}


class _Answer(msgspec.Struct):
    results: list[_Result]


_decoder = msgspec.json.Decoder(_Answer)


class Assessment(msgspec.Struct, frozen=True):
    """What the deployment made of one text: the categories it flagged, and every score."""

    flagged: tuple[str, ...]
    scores: dict[str, float]


class Moderator:
    """One moderation check's deployment, asked through the node's HTTP client."""

    def __init__(self, check: ModerationCheck, upstream: Upstream, client: httpx.AsyncClient):
        self.url = (upstream.base_url or _DEFAULT_URL).rstrip("/") + "/moderations"
        self.model = upstream.model
        self.headers = {"content-type": "application/json", **upstream.headers}
        if upstream.api_key:
            self.headers["authorization"] = f"Bearer {upstream.api_key}"
        self.timeout = check.timeout
        self.on_error = check.on_error
        self.counted = frozenset(check.categories)
        self.client = client

    async def assess(self, texts: list[str]) -> list[Assessment]:
        """Each text's assessment, in order (a `ModerationFailed` if there is none)."""
        if not texts:
            return []
        body = msgspec.json.encode({"model": self.model, "input": texts})
        try:
            # The whole exchange's deadline: httpx's timeout is per read, which a deployment
            # that trickles bytes would pass.
            with anyio.fail_after(self.timeout):
                answer = _decoder.decode(
                    await post_bounded(self.client, self.url, body, self.headers, self.timeout)
                )
        except ServiceFailed as exc:
            log.warning("moderation deployment %s failed: %s", self.url, exc)
            raise ModerationFailed(str(exc)) from None
        except Exception as exc:  # a timeout, a refused connection, a body not JSON
            log.warning("moderation deployment %s failed: %s", self.url, type(exc).__name__)
            raise ModerationFailed(type(exc).__name__) from None
        if len(answer.results) != len(texts):
            raise ModerationFailed("not one result per text")
        return [self._read(result) for result in answer.results]

    def _read(self, result: _Result) -> Assessment:
        named = {**result.categories, **result.category_scores}
        if len(named) > _MAX_CATEGORIES or not all(map(_CATEGORY.fullmatch, named)):
            raise ModerationFailed("category names that are not OpenAI's kind")
        flagged = sorted(
            name
            for name, on in result.categories.items()
            if on and (not self.counted or name in self.counted)
        )
        if result.flagged and not flagged and not self.counted and not result.categories:
            flagged = ["flagged"]  # flagged, without saying why
        return Assessment(tuple(flagged), dict(result.category_scores))
