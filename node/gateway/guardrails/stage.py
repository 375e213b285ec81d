"""The guardrails stage of the pipeline: which profile applies to a caller, the input checks
(after admission, before routing), the output checks on a complete or streamed answer and its
moderation deployments; every block and redaction an audit event and a metric."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any

import anyio
import httpx
from prometheus_client import CollectorRegistry, Counter

from adapters.types import ChatCall, ChatResult, CompletionCall, Upstream, WireResult
from node.config import GuardrailProfile, GuardrailsSection, InjectionCheck
from node.errors import HubError, Kind
from node.gateway.auth import Principal
from node.gateway.guardrails.checks import Built, Profile, build_profile
from node.gateway.guardrails.findings import Finding, Redaction, Replacer, Span, literals_of
from node.gateway.guardrails.moderator import ModerationFailed
from node.gateway.guardrails.stream import guarded
from node.gateway.guardrails.stream_moderation import moderated_stream
from node.gateway.guardrails.texts import call_texts, result_texts, rewrite_call, rewrite_result
from node.storage.records import AuditEvent

if TYPE_CHECKING:
    from node.gateway.accounting import Accounting

# Past this many characters a request's checks run in a worker thread, off the event loop.
_THREAD_FROM = 32_768


class Verdict:
    """What a profile's checks made of some texts: the findings, and the literals to replace."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self.literals: dict[str, str] = {}
        self.blocked: Finding | None = None
        # What the check that blocked found: never sent anywhere, and never kept either.
        self.withheld: dict[str, str] = {}


def judge(checks: list[Built], texts: list[str]) -> Verdict:
    """Run the checks in order over the texts; the first that blocks ends it."""
    verdict = Verdict()
    for check in checks:
        spans: list[Span] = []
        literals: dict[str, str] = {}
        if check.max_chars is not None:
            if sum(len(text) for text in texts) > check.max_chars:
                spans.append(Span("INPUT_TOO_LARGE", 0, 0))
        elif check.detector is not None:
            for text in texts:
                found = check.detector.find(text)
                spans += found
                literals.update(literals_of(text, (s for s in found if s.end > s.start)))
        if not spans:
            continue
        finding = Finding.of(check.name, check.action, spans)
        verdict.findings.append(finding)
        if check.action == "block":
            verdict.blocked = finding
            verdict.withheld = literals
            return verdict
        if check.action == "redact":
            verdict.literals.update(literals)
    return verdict


def blocked_error(finding: Finding, reason: str = "") -> HubError:
    """The client's error: the check and what kind of thing it found, never the thing (or,
    from a webhook, the reason it gave)."""
    said = reason or f"it holds {', '.join(finding.kinds)}"
    message = f"This request was blocked by the guardrail `{finding.check}`: {said}"
    return HubError(Kind.INVALID_REQUEST, message, code="guardrail_blocked")


async def moderated(check: Built, texts: list[str], verdict: Verdict) -> str:
    """A moderation deployment's say on the texts, a finding if it flags any: the reason of
    a block ("" if it does not block)."""
    moderator = check.moderator
    assert moderator is not None
    try:
        assessed = await moderator.assess(texts)
    except ModerationFailed:
        if moderator.on_error == "allow":
            return ""
        finding = Finding(check.name, "block", ("MODERATION_UNAVAILABLE",), (1,))
        verdict.findings.append(finding)
        verdict.blocked = finding
        return "the moderation deployment did not answer"
    flagged = [category for assessment in assessed for category in assessment.flagged]
    if not flagged:
        return ""
    finding = Finding.of(check.name, check.action, (Span(name, 0, 0) for name in flagged))
    verdict.findings.append(finding)
    if check.action != "block":
        return ""
    verdict.blocked = finding
    return f"flagged as {', '.join(finding.kinds)}"


async def ask_hooks(
    checks: list[Built], texts: list[str], request_id: str, verdict: Verdict
) -> tuple[dict[str, str], str]:
    """The profile's remote checks, in order, on the texts (as the checks before left them):
    what webhooks redact (whole texts, old → new), and the reason of a block (which ends it)."""
    replaced: dict[str, str] = {}
    for check in checks:
        if check.moderator is not None:
            reason = await moderated(check, texts, verdict)
            if verdict.blocked is not None:
                return replaced, reason
            continue
        if check.hook is None:
            continue
        answer = await check.hook.ask(check.name, request_id, texts)
        if answer.verdict == "allow":
            continue
        kind = "WEBHOOK_BLOCK" if answer.verdict == "block" else "WEBHOOK_REDACTION"
        action = "log" if check.action == "log" else answer.verdict
        finding = Finding(check.name, action, (kind,), (1,))
        verdict.findings.append(finding)
        if action == "block":
            verdict.blocked = finding
            return replaced, answer.reason
        if action == "redact":
            changed = {old: new for old, new in zip(texts, answer.texts, strict=True) if old != new}
            replaced.update(changed)
            texts = [changed.get(text, text) for text in texts]
    return replaced, ""


class Guardrails:
    """The node's profiles, built at start (a check's library is imported only if a profile
    uses it), and which one applies to whom."""

    def __init__(
        self,
        section: GuardrailsSection,
        registry: CollectorRegistry,
        audit: Callable[[AuditEvent], None],
        client: httpx.AsyncClient | None = None,
        upstream_of: Callable[[str], Upstream] | None = None,
    ) -> None:
        self.section = section
        self.profiles = {
            name: build_profile(name, profile, client, upstream_of)
            for name, profile in section.profiles.items()
        }
        self._audit = audit
        # What `/v1/moderations` assesses a caller with no profile by.
        moderation = GuardrailProfile(checks=[InjectionCheck(action="log")])
        self.fallback = build_profile("moderation", moderation).checks
        self.findings = Counter(
            "aihub_guardrail_findings",
            "Guardrail findings, by check, action, tenant and stage (input|output)",
            ["check", "action", "tenant", "stage"],
            registry=registry,
        )

    def profile_for(self, principal: Principal) -> Profile | None:
        """A key's profile (by name or id), else its tenant's, else a peer's, else the default."""
        section = self.section
        if not self.profiles:
            return None
        key = principal.key
        name = section.keys.get(key.id) or section.keys.get(key.name)
        if not name and principal.tenant is not None:
            name = section.tenants.get(principal.tenant.name)
        if not name and key.peer_id is not None:
            name = section.peers
        return self.profiles.get(name or section.default)

    def rewriter(self, principal: Principal) -> str:
        """The name of the profile that may rewrite this caller's requests before an upstream
        sees them (a redacting input check, a webhook), else "": the response cache keeps
        what was answered to such a rewritten request apart."""
        profile = self.profile_for(principal)
        if profile is None:
            return ""
        rewrites = any(
            c.action == "redact" or c.hook is not None for c in profile.input + profile.hooks
        )
        return profile.name if rewrites else ""

    def record(self, verdict: Verdict, books: Accounting, stage: str, ip: str | None) -> None:
        """Each finding a metric, an audit event if it changed the request, and a line of the
        request's interaction log if it has one."""
        principal, request_id = books.principal, books.request_id
        if books.log is not None:
            books.log.found(stage, verdict.findings)
        tenant = principal.tenant.name if principal.tenant is not None else ""
        for finding in verdict.findings:
            self.findings.labels(finding.check, finding.action, tenant, stage).inc()
            if finding.action == "log":
                continue  # recorded as a metric; an audit event is for what changed a request
            detail: dict[str, str | int | None] = {
                "check": finding.check,
                "found": ",".join(finding.kinds),
                "stage": stage,
                "request_id": request_id,
                "tenant": tenant or None,
            }
            action = f"guardrail.{'blocked' if finding.action == 'block' else 'redacted'}"
            self._audit(
                AuditEvent(int(time.time() * 1000), action, principal.key.id, None, ip, detail)
            )

    async def screen_input(
        self,
        profile: Profile,
        call: ChatCall | CompletionCall,
        books: Accounting,
        ip: str | None = None,
    ) -> None:
        """The input checks, then the webhooks: a block raises the client's error, a
        redaction rewrites the call before any upstream sees it, and is kept in the books
        (`Accounting.redaction`) for what the node keeps of the request: its interaction log
        holds the body as the upstream was sent it (a blocked one without what blocked it).
        With output checks, the answer is asked in the neutral form (not a native
        passthrough) so that the node can read and redact it."""
        texts = call_texts(call)
        if sum(len(text) for text in texts) > _THREAD_FROM:
            verdict = await anyio.to_thread.run_sync(judge, profile.input, texts)
        else:
            verdict = judge(profile.input, texts)
        redaction = Redaction()
        if verdict.literals:
            redaction.add(Replacer(verdict.literals))
        reason = ""
        if verdict.blocked is None and profile.hooks:
            # The webhooks read the texts as the checks before them left them.
            texts = [redaction(text) for text in texts]
            hooked, reason = await ask_hooks(profile.hooks, texts, call.request_id, verdict)
            if hooked:
                redaction.add(Replacer(hooked))
        self.record(verdict, books, "input", ip)
        if verdict.blocked is not None:
            if books.log is not None:
                books.log.redact(Replacer({**verdict.literals, **verdict.withheld}))
            raise blocked_error(verdict.blocked, reason)
        if redaction:
            rewrite_call(call, redaction)
            books.redaction = redaction
            if books.log is not None:
                books.log.redact(redaction)
        if (profile.output or profile.moderated) and isinstance(call, ChatCall):
            call.native = None

    def guard_stream(
        self, profile: Profile, items: AsyncGenerator[Any, None], books: Accounting
    ) -> AsyncGenerator[Any, None]:
        """A chat stream's items through the profile's output checks (`stream.py`)."""

        def seen(finding: Finding) -> None:
            verdict = Verdict()
            verdict.findings.append(finding)
            self.record(verdict, books, "output", None)

        return guarded(items, profile.output, profile.hold_back, seen)

    def screen_result(
        self,
        profile: Profile,
        result: ChatResult | WireResult,
        books: Accounting,
    ) -> ChatResult | WireResult:
        """The output checks on a complete answer: what they find is redacted (or logged)."""
        checks = profile.output
        if not checks:
            return result
        texts, document = result_texts(result)
        if not texts:
            return result
        verdict = judge(checks, texts)
        self.record(verdict, books, "output", None)
        if not verdict.literals:
            return result
        return rewrite_result(result, document, Replacer(verdict.literals))

    async def _moderate_texts(
        self, profile: Profile, texts: list[str], books: Accounting
    ) -> HubError | None:
        """An answer's texts sent to the profile's output moderation deployments: the
        client's error if one of them blocks it."""
        texts = [text for text in texts if text]
        if not texts:
            return None
        verdict = Verdict()
        reason = ""
        for check in profile.moderated:
            reason = await moderated(check, texts, verdict)
            if verdict.blocked is not None:
                break
        self.record(verdict, books, "output", None)
        if verdict.blocked is None:
            return None
        message = f"The answer was withheld by the guardrail `{verdict.blocked.check}`: {reason}"
        return HubError(Kind.INVALID_REQUEST, message, code="guardrail_blocked")

    async def moderate_answer(
        self, profile: Profile, result: ChatResult | WireResult, books: Accounting
    ) -> HubError | None:
        """A complete answer sent to the profile's output moderation deployments: the
        client's error if one of them blocks it (the caller settles the request)."""
        texts, _ = result_texts(result)
        return await self._moderate_texts(profile, texts, books)

    def moderate_stream(
        self, profile: Profile, items: AsyncGenerator[Any, None], books: Accounting
    ) -> AsyncGenerator[Any, None]:
        """A chat stream's whole text sent to the profile's output moderation deployments
        before its end (`stream_moderation.py`); a block ends it with the client's error, and
        is what the usage record says of it (`Accounting.withheld`)."""

        async def judge(texts: list[str]) -> HubError | None:
            blocked = await self._moderate_texts(profile, texts, books)
            books.withheld = blocked
            return blocked

        return moderated_stream(items, judge)
