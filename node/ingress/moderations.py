"""OpenAI's `POST /v1/moderations`, answered by the node's own guardrail checks
(`node/gateway/guardrails/moderation.py`) and the moderation deployments of the caller's
profile, if it has any; nothing is charged."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
from litestar import Request

from federation.ids import new_request_id
from node.errors import HubError, Kind
from node.gateway.guardrails.moderation import moderate, with_deployments
from node.gateway.guardrails.moderator import ModerationFailed
from node.hub import hub_of
from node.ingress.asgi import Reply, authenticate, post_endpoint, read_body
from node.ingress.errors import ApiError
from node.ingress.openai import decode_body

# More inputs than this in one request is refused: each is read by every check.
MAX_INPUTS = 256


class ModerationRequest(msgspec.Struct):
    input: str | list[Any]
    model: str | None = None


_decoder = msgspec.json.Decoder(ModerationRequest)


def _texts(value: str | list[Any]) -> list[str]:
    """One text per string; a list of content parts (text and images) is one input, whose
    text parts are read together (OpenAI's multi-modal form: one result)."""
    if isinstance(value, str):
        return [value]
    if len(value) > MAX_INPUTS:
        raise ApiError(400, f"At most {MAX_INPUTS} inputs in one request", param="input")
    if all(isinstance(item, str) for item in value):
        return list(value)
    parts = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            raise ApiError(400, "Each input is a string or a content part", param="input")
        if item["type"] == "text":
            if not isinstance(item.get("text"), str):
                raise ApiError(400, "A text part has a string `text`", param="input")
            parts.append(item["text"])
    return ["\n".join(parts)]


async def _moderations(request: Request) -> Reply:
    principal = await authenticate(request)
    body, _ = decode_body(await read_body(request, principal), _decoder)
    texts = _texts(body.input)
    guardrails = hub_of(request).guardrails
    profile = guardrails.profile_for(principal)
    # Off the event loop: a body of megabytes is read by every check.
    result = await anyio.to_thread.run_sync(moderate, profile, guardrails.fallback, texts)
    if profile is not None:
        try:
            await with_deployments(result, profile, texts)
        except ModerationFailed:
            message = "The moderation deployment did not answer; try again later"
            raise HubError(Kind.UNAVAILABLE, message, code="moderation_unavailable") from None
    return Reply(msgspec.json.encode(result), {"aihub-request-id": new_request_id()})


moderations = post_endpoint("/v1/moderations", _moderations)

ROUTES = [moderations]
