"""A profile's checks, built once at start: each kind of check behind one small interface."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Protocol

from node.config import (
    BannedCheck,
    Check,
    ConfigError,
    GuardrailProfile,
    InjectionCheck,
    ModerationCheck,
    PiiCheck,
    SecretsCheck,
    SizeCheck,
    WebhookCheck,
)
from node.gateway.guardrails.findings import Span

if TYPE_CHECKING:
    from collections.abc import Callable

    import httpx

    from adapters.types import Upstream
    from node.gateway.guardrails.moderator import Moderator
    from node.gateway.guardrails.webhook import Webhook


class Detector(Protocol):
    def find(self, text: str) -> list[Span]:
        """What the check finds in one text (a span of 0 length: found, not redactable)."""
        ...


class Built(NamedTuple):
    name: str
    action: str
    detector: Detector | None
    # The most text a request holds, for a size check (which reads every text together).
    max_chars: int | None = None
    output: bool = False
    input: bool = True
    hook: Webhook | None = None
    kind: str = ""
    moderator: Moderator | None = None

    @property
    def remote(self) -> bool:
        """Asked over HTTP (a webhook, a moderation deployment), after the in-process checks."""
        return self.hook is not None or self.moderator is not None


def _detector(check: Check) -> Detector | None:
    try:
        return _import_detector(check)
    except ImportError as exc:
        raise ConfigError(
            f"guardrails: a {_kind(check)} check needs {exc.name}: pip install 'aihub[guardrails]'"
        ) from exc


def _import_detector(check: Check) -> Detector | None:
    # Each kind's module is imported only when a profile has it (Presidio takes a second).
    if isinstance(check, PiiCheck):
        from node.gateway.guardrails.pii import Pii

        return Pii(check)
    if isinstance(check, SecretsCheck):
        from node.gateway.guardrails.secrets import Secrets

        return Secrets(check)
    if isinstance(check, BannedCheck):
        from node.gateway.guardrails.words import BannedWords

        return BannedWords(check)
    if isinstance(check, InjectionCheck):
        from node.gateway.guardrails.injection import Injection

        return Injection(check)
    return None


def _kind(check: Check) -> str:
    return type(check).__struct_config__.tag  # type: ignore[return-value]


class Profile(NamedTuple):
    name: str
    checks: list[Built]
    hold_back: int

    @property
    def input(self) -> list[Built]:
        """The checks run in-process on a request (the remote ones are asked after them)."""
        return [check for check in self.checks if check.input and not check.remote]

    @property
    def hooks(self) -> list[Built]:
        """The remote checks of a request, in order: webhooks and moderation deployments."""
        return [check for check in self.checks if check.input and check.remote]

    @property
    def output(self) -> list[Built]:
        """The in-process checks of an answer (streamed or not)."""
        return [check for check in self.checks if check.output and not check.remote]

    @property
    def moderated(self) -> list[Built]:
        """The moderation deployments a complete answer is sent to."""
        return [check for check in self.checks if check.output and check.moderator is not None]


def _hook(check: Check, client: httpx.AsyncClient | None) -> Webhook | None:
    if not isinstance(check, WebhookCheck):
        return None
    from node.gateway.guardrails.webhook import Webhook

    if client is None:
        raise ValueError("a webhook check needs the node's HTTP client")
    return Webhook(check, client)


def _moderator(
    check: Check,
    client: httpx.AsyncClient | None,
    upstream_of: Callable[[str], Upstream] | None,
) -> Moderator | None:
    if not isinstance(check, ModerationCheck):
        return None
    from node.gateway.guardrails.moderator import Moderator

    if client is None or upstream_of is None:
        raise ValueError("a moderation check needs the node's HTTP client and deployments")
    return Moderator(check, upstream_of(check.deployment), client)


def build_profile(
    name: str,
    profile: GuardrailProfile,
    client: httpx.AsyncClient | None = None,
    upstream_of: Callable[[str], Upstream] | None = None,
) -> Profile:
    """The profile's checks built (`client` POSTs to its webhooks and moderation
    deployments, whose upstreams `upstream_of` names)."""
    built: list[Built] = []
    for check in profile.checks:
        both = isinstance(check, PiiCheck | SecretsCheck | ModerationCheck)
        output = both and check.output  # type: ignore[union-attr]
        on_input = not both or check.input  # type: ignore[union-attr]
        max_chars = check.max_chars if isinstance(check, SizeCheck) else None
        name = check.name or _kind(check)
        hook = _hook(check, client)
        detector = _detector(check)
        moderator = _moderator(check, client, upstream_of)
        built.append(
            Built(
                name,
                check.action,
                detector,
                max_chars,
                output,
                on_input,
                hook,
                _kind(check),
                moderator,
            )
        )
    # The size check first: it is the cheapest, and it keeps a huge text from the others.
    built.sort(key=lambda check: check.max_chars is None)
    return Profile(name, built, profile.hold_back)
