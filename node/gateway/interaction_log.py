"""Interaction logs: what a key (or a tenant's keys) asked and was answered, kept for a while.

Off unless a key's limits say `log = true` (else its tenant's). A logged request carries a
`LogDraft` in its books (`Accounting.log`) from the ingress on: the client's body (never a
header: no Authorization, no key) as the upstream was sent it, that is with what the
guardrails redacted replaced (and, for a request they blocked, without what blocked it), then
the answer as the client got it, after the output checks (a complete one's JSON, or a
stream's text as it passed); when the request settles, its usage record and the draft become
one `InteractionLog`, written off the request path, and the usage record names it (`log_id`).
`findings` is the guardrails' findings, a JSON list of `{stage, check, action, kind, count}`
(what kind of thing, how many: never the thing). Each body is cut at `[interaction_logs]
max_body_bytes` (`truncated` says so); a scheduled prune forgets entries past
`retention_days`, then the oldest beyond `max_bytes` in all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import msgspec

from adapters.events import OpenAIChunk, TextDelta
from adapters.types import ChatResult
from node.config import InteractionLogSection
from node.gateway.auth import Principal
from node.storage.base import LogStore
from node.storage.records import InteractionLog, UsageRecord

if TYPE_CHECKING:
    from node.gateway.guardrails.findings import Finding

log = logging.getLogger("aihub.logs")

_DAY_MS = 86_400_000


def enabled_for(principal: Principal) -> bool:
    """The key's say, else its tenant's; off if neither says."""
    if principal.key.limits.log is not None:
        return principal.key.limits.log
    return principal.tenant is not None and bool(principal.tenant.limits.log)


class LoggedFinding(msgspec.Struct):
    """One line of an entry's `findings`: a check found `count` things of one `kind`."""

    stage: str  # input | output
    check: str
    action: str
    kind: str
    count: int


class LogDraft:
    """A logged request's bodies while it runs, each bounded when the entry is made (the
    request's whole until then, so that a redaction can still be applied to it)."""

    def __init__(self, request: bytes, limit: int) -> None:
        self._limit = limit
        self.truncated = False
        self._request = request
        self.response = b""
        self._text: list[str] = []
        self._text_bytes = 0
        self._found: dict[tuple[str, str, str, str], int] = {}

    @property
    def request(self) -> bytes:
        return self._request[: self._limit]

    @property
    def cut(self) -> bool:
        """Whether a body was cut at the bound."""
        return self.truncated or len(self._request) > self._limit

    def redact(self, replace: Callable[[str], str]) -> None:
        """The request body as the guardrails left it (`replace` applied to its strings)."""
        from node.gateway.guardrails.texts import redacted_json  # only with a profile

        self._request = redacted_json(self._request, replace)

    def found(self, stage: str, findings: Iterable[Finding]) -> None:
        """The guardrails' findings, counted by stage, check, action and kind."""
        for finding in findings:
            counts = finding.counts or (1,) * len(finding.kinds)
            for kind, count in zip(finding.kinds, counts, strict=True):
                line = (stage, finding.check, finding.action, kind)
                self._found[line] = self._found.get(line, 0) + count

    @property
    def findings(self) -> bytes:
        lines = [LoggedFinding(*line, count) for line, count in self._found.items()]
        return msgspec.json.encode(lines)

    def answered(self, result: ChatResult) -> None:
        """A complete answer, as the JSON it was (or would be) sent in."""
        if result.wire is not None:
            body = result.wire
        elif result.native is not None:
            body = result.native
        else:
            body = msgspec.json.encode(result.chat_completion())
        self.truncated = self.truncated or len(body) > self._limit
        self.response = body[: self._limit]

    def streamed(self, event: Any) -> None:
        """A stream's event: its text kept, up to the bound."""
        if self._text_bytes > self._limit:
            return
        events = event.events() if isinstance(event, OpenAIChunk) else [event]
        for item in events:
            if isinstance(item, TextDelta):
                self._text.append(item.text)
                self._text_bytes += len(item.text.encode())
        if self._text_bytes > self._limit:
            self.truncated = True

    def response_body(self) -> bytes:
        if self.response or not self._text:
            return self.response
        text = "".join(self._text).encode()[: self._limit].decode(errors="ignore")
        return msgspec.json.encode({"stream_text": text})


def entry_of(record: UsageRecord, draft: LogDraft, peer: str | None) -> InteractionLog:
    return InteractionLog(
        request_id=record.request_id,
        ts_ms=record.ts_ms,
        key_id=record.key_id,
        tenant_id=record.tenant_id,
        model=record.model,
        endpoint=record.endpoint,
        deployment=record.deployment,
        peer=peer,
        stream=record.stream,
        status=record.status,
        tokens_in=record.tokens_in,
        tokens_out=record.tokens_out,
        cost_micros=record.cost_micros,
        latency_ms=record.latency_ms,
        cache_hit=record.cache_hit,
        error=record.error,
        request=draft.request,
        response=draft.response_body(),
        findings=draft.findings,
        truncated=draft.cut,
    )


class InteractionLogger:
    """Drafts for the requests that are logged, and their entries written off the path."""

    def __init__(self, store: LogStore, config: InteractionLogSection) -> None:
        self._store = store
        self.config = config
        self._writing: set[asyncio.Task[None]] = set()

    def draft(self, principal: Principal, body: bytes) -> LogDraft | None:
        if not enabled_for(principal):
            return None
        return LogDraft(body, self.config.max_body_bytes)

    def settled(self, draft: LogDraft, record: UsageRecord, peer: str | None) -> None:
        task = asyncio.get_running_loop().create_task(self._write(entry_of(record, draft, peer)))
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)

    async def _write(self, entry: InteractionLog) -> None:
        try:
            await self._store.insert_log(entry)
        except Exception:
            log.exception("the interaction log of %s could not be written", entry.request_id)

    async def flush(self) -> None:
        """Wait for the entries being written."""
        if self._writing:
            await asyncio.gather(*self._writing, return_exceptions=True)

    async def prune(self) -> None:
        """Forget entries past their retention, then the oldest beyond the size cap."""
        before = int(time.time() * 1000) - self.config.retention_days * _DAY_MS
        await self._store.prune_logs(before, self.config.max_bytes)
