"""The external guardrail hook: a configured HTTP endpoint is POSTed a request's texts and
answers what to do with them.

    → {"check": "NAME", "stage": "input", "request_id": "req_…", "texts": ["…", …]}
    ← {"verdict": "allow"}
    ← {"verdict": "block", "reason": "…"}              (the reason is shown to the client)
    ← {"verdict": "redact", "texts": ["…", …]}          (the same number of texts)

An answer that does not arrive within `timeout` seconds, a status other than 200, or a body
that is none of these (more than 1 MiB, not JSON, the wrong number of texts) is an error, and
`on_error` says what it means: `allow` (fail open) or `block` (fail closed).
"""

from __future__ import annotations

import logging
from typing import Literal

import anyio
import httpx
import msgspec

from node.config import WebhookCheck
from node.gateway.guardrails.exchange import post_bounded

log = logging.getLogger("aihub.guardrails")
_HEADERS = {"content-type": "application/json"}
_REASON_MAX = 200


class _Ask(msgspec.Struct):
    check: str
    stage: str
    request_id: str
    texts: list[str]


class _Answer(msgspec.Struct):
    verdict: Literal["allow", "block", "redact"]
    reason: str = ""
    texts: list[str] | None = None


_decoder = msgspec.json.Decoder(_Answer)


class HookVerdict(msgspec.Struct, frozen=True):
    verdict: str  # allow | block | redact
    reason: str = ""
    texts: tuple[str, ...] = ()


class Webhook:
    def __init__(self, check: WebhookCheck, client: httpx.AsyncClient) -> None:
        self.url = check.url
        self.timeout = check.timeout
        self.on_error = check.on_error
        self.client = client

    async def ask(self, name: str, request_id: str, texts: list[str]) -> HookVerdict:
        body = msgspec.json.encode(_Ask(name, "input", request_id, texts))
        try:
            # The whole exchange's deadline: httpx's timeout is per read, which a hook that
            # trickles bytes would pass.
            with anyio.fail_after(self.timeout):
                answer = _decoder.decode(
                    await post_bounded(self.client, self.url, body, _HEADERS, self.timeout)
                )
            if answer.verdict == "redact" and (
                answer.texts is None or len(answer.texts) != len(texts)
            ):
                raise ValueError("a redaction without one text per text sent")
        except Exception as exc:
            log.warning("guardrail hook %s failed: %s", self.url, exc)
            if self.on_error == "allow":
                return HookVerdict("allow")
            return HookVerdict("block", "the guardrail service did not answer")
        reason = answer.reason[:_REASON_MAX]
        return HookVerdict(answer.verdict, reason, tuple(answer.texts or ()))
