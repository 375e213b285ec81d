"""API keys, tokens and private keys, through Yelp's detect-secrets: its provider plugins'
own patterns (AWS, Azure storage, GitHub, GitLab, OpenAI, Slack, Stripe, Twilio, SendGrid,
npm, PyPI, Discord, Telegram, Mailchimp, Square, Artifactory, JWTs, URLs with a password,
private key headers), read for where they match, so that what matched can be redacted.

detect-secrets' scanner is built for files (its settings are process-global, its filters
read files); its plugins' patterns are what is kept and reviewed, so those are used as they
are. Added here, because detect-secrets has none for them: Anthropic, Google, Hugging Face
keys and OpenAI's project and service-account keys. A private key is redacted from its
`-----BEGIN` line to its `-----END` line.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from node.config import SecretsCheck
from node.gateway.guardrails.findings import Span

_EXTRA = [
    ("Anthropic API Key", re.compile(r"\bsk-ant-[A-Za-z0-9_-]{32,}")),
    ("OpenAI Token", re.compile(r"\bsk-(?:proj|svcacct|admin)-[A-Za-z0-9_-]{20,}")),
    ("Google API Key", re.compile(r"\bAIza[0-9A-Za-z_-]{35}")),
    ("Hugging Face Token", re.compile(r"\bhf_[A-Za-z0-9]{34,}")),
]
_PRIVATE_KEY = "Private Key"
# The block around a private key header, up to its end line (or 8 KB on, if it has none).
_KEY_BLOCK = re.compile(r"-----END[ A-Z0-9]*-----|\Z")
_KEY_BLOCK_MAX = 8192


def _patterns() -> list[tuple[str, re.Pattern[str]]]:
    """Every plugin's patterns, with what each finds, then ours."""
    from detect_secrets.plugins import (
        artifactory,
        aws,
        azure_storage_key,
        basic_auth,
        discord,
        github_token,
        gitlab_token,
        jwt,
        mailchimp,
        npm,
        openai,
        private_key,
        pypi_token,
        sendgrid,
        slack,
        square_oauth,
        stripe,
        telegram_token,
        twilio,
    )

    plugins: list[Any] = [
        artifactory.ArtifactoryDetector,
        aws.AWSKeyDetector,
        azure_storage_key.AzureStorageKeyDetector,
        basic_auth.BasicAuthDetector,
        discord.DiscordBotTokenDetector,
        github_token.GitHubTokenDetector,
        gitlab_token.GitLabTokenDetector,
        jwt.JwtTokenDetector,
        mailchimp.MailchimpDetector,
        npm.NpmDetector,
        openai.OpenAIDetector,
        private_key.PrivateKeyDetector,
        pypi_token.PypiTokenDetector,
        sendgrid.SendGridDetector,
        slack.SlackDetector,
        square_oauth.SquareOAuthDetector,
        stripe.StripeDetector,
        telegram_token.TelegramBotTokenDetector,
        twilio.TwilioKeyDetector,
    ]
    found = [(plugin.secret_type, regex) for plugin in plugins for regex in plugin.denylist]
    return found + _EXTRA


# What a plugin's pattern cannot match without: one of these strings in the text (in the
# text case-folded if the pattern ignores case). A pattern is run only on a text that holds
# one, so that prose, which holds none, costs a few substring searches instead of every
# pattern's scan (~300 µs per 1 KB, most of it the patterns that start with a class, such as
# Mailchimp's `[0-9a-z]{32}-us`, or with `\b`, which no literal-prefix search skips). Keyed
# by the pattern itself: one that a detect-secrets release changes has no gate and always
# runs. `tests/test_guardrails_gates.py` holds each gate to its pattern.
_GATES: dict[str, tuple[str, ...]] = {
    r'(?:\s|=|:|"|^)AKC[a-zA-Z0-9]{10,}(?:\s|"|$)': ("AKC",),
    r'(?:\s|=|:|"|^)AP[\dABCDEF][a-zA-Z0-9]{8,}(?:\s|"|$)': ("AP",),
    r"(?:A3T[A-Z0-9]|ABIA|ACCA|AKIA|ASIA)[0-9A-Z]{16}": ("A3T", "ABIA", "ACCA", "AKIA", "ASIA"),
    r"aws.{0,20}?(?:key|pwd|pw|password|pass|token).{0,20}?[\'\"]([0-9a-zA-Z/+]{40})[\'\"]": (
        "aws",
    ),
    r"AccountKey=[a-zA-Z0-9+\/=]{88}": ("AccountKey=",),
    r"://[^:/\?\#\[\]@!\$\&'\(\)\*\+,;=\s]+:([^:/\?\#\[\]@!\$\&'\(\)\*\+,;=\s]+)@": ("://",),
    r"(ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9_]{36}": ("ghp_", "gho_", "ghu_", "ghs_", "ghr_"),
    r"(glpat|gldt|glft|glsoat|glrt)-[A-Za-z0-9_\-]{20,50}(?!\w)": (
        "glpat-",
        "gldt-",
        "glft-",
        "glsoat-",
        "glrt-",
    ),
    r"GR1348941[A-Za-z0-9_\-]{20,50}(?!\w)": ("GR1348941",),
    r"glcbt-([0-9a-fA-F]{2}_)?[A-Za-z0-9_\-]{20,50}(?!\w)": ("glcbt-",),
    r"glimt-[A-Za-z0-9_\-]{25}(?!\w)": ("glimt-",),
    r"glptt-[A-Za-z0-9_\-]{40}(?!\w)": ("glptt-",),
    r"glagent-[A-Za-z0-9_\-]{50,1024}(?!\w)": ("glagent-",),
    r"gloas-[A-Za-z0-9_\-]{64}(?!\w)": ("gloas-",),
    r"eyJ[A-Za-z0-9-_=]+\.[A-Za-z0-9-_=]+\.?[A-Za-z0-9-_.+/=]*?": ("eyJ",),
    r"[0-9a-z]{32}-us[0-9]{1,2}": ("-us",),
    r"\/\/.+\/:_authToken=\s*((npm_.+)|([A-Fa-f0-9-]{36})).*": ("/:_authToken=",),
    r"sk-[A-Za-z0-9-_]*[A-Za-z0-9]{20}T3BlbkFJ[A-Za-z0-9]{20}": ("T3BlbkFJ",),
    r"pypi-AgEIcHlwaS5vcmc[A-Za-z0-9-_]{70,}": ("pypi-AgEIcHlwaS5vcmc",),
    r"pypi-AgENdGVzdC5weXBpLm9yZw[A-Za-z0-9-_]{70,}": ("pypi-AgENdGVzdC5weXBpLm9yZw",),
    r"SG\.[a-zA-Z0-9_-]{22}\.[a-zA-Z0-9_-]{43}": ("SG.",),
    r"xox(?:a|b|p|o|s|r)-(?:\d+-)+[a-z0-9]+": ("xox",),
    r"https://hooks\.slack\.com/services/T[a-zA-Z0-9_]+/B[a-zA-Z0-9_]+/[a-zA-Z0-9_]+": (
        "https://hooks.slack.com/services/",
    ),
    r"sq0csp-[0-9A-Za-z\\\-_]{43}": ("sq0csp-",),
    r"(?:r|s)k_live_[0-9a-zA-Z]{24}": ("k_live_",),
    r"\d{8,10}:[0-9A-Za-z_-]{35}": (":",),
    r"AC[a-z0-9]{32}": ("AC",),
    r"SK[a-z0-9]{32}": ("SK",),
    r"\bsk-ant-[A-Za-z0-9_-]{32,}": ("sk-ant-",),
    r"\bsk-(?:proj|svcacct|admin)-[A-Za-z0-9_-]{20,}": ("sk-proj-", "sk-svcacct-", "sk-admin-"),
    r"\bAIza[0-9A-Za-z_-]{35}": ("AIza",),
    r"\bhf_[A-Za-z0-9]{34,}": ("hf_",),
}


class _Pattern(NamedTuple):
    kind: str
    regex: re.Pattern[str]


class _Gate(NamedTuple):
    literal: str
    folded: bool  # looked for in the text case-folded (its pattern ignores case)
    patterns: frozenset[int]  # the indices of the patterns it lets run


def _gates(patterns: list[_Pattern]) -> tuple[list[_Gate], frozenset[int]]:
    """Each gate's literal with the patterns it opens, and the patterns with no gate."""
    opens: dict[tuple[str, bool], set[int]] = {}
    always = set()
    for index, pattern in enumerate(patterns):
        folds = bool(pattern.regex.flags & re.IGNORECASE)
        literals = _GATES.get(pattern.regex.pattern)
        if not literals:
            always.add(index)
        for literal in literals or ():
            key = (literal.casefold() if folds else literal, folds)
            opens.setdefault(key, set()).add(index)
    gates = [_Gate(literal, folds, frozenset(found)) for (literal, folds), found in opens.items()]
    return gates, frozenset(always)


def _span(kind: str, match: re.Match[str], text: str) -> Span:
    if kind == _PRIVATE_KEY:
        start = text.rfind("-----", max(0, match.start() - 16), match.start())
        start = start if start >= 0 else match.start()
        window = text[match.end() : match.end() + _KEY_BLOCK_MAX]
        end = _KEY_BLOCK.search(window)
        assert end is not None  # `\Z` always matches
        return Span(kind, start, match.end() + end.end())
    # The whole match: a plugin's groups are prefixes (`ghp`) as often as the secret.
    return Span(kind, match.start(), match.end())


class Secrets:
    def __init__(self, check: SecretsCheck) -> None:
        self._patterns = [_Pattern(kind, regex) for kind, regex in _patterns()]
        self._gates, self._always = _gates(self._patterns)

    def _runnable(self, text: str) -> list[_Pattern]:
        """The patterns whose gate the text holds (and those with none), in order."""
        folded = text.casefold() if any(gate.folded for gate in self._gates) else text
        run = set(self._always)
        for gate in self._gates:
            if gate.literal in (folded if gate.folded else text):
                run |= gate.patterns
        return [self._patterns[index] for index in sorted(run)]

    def find(self, text: str) -> list[Span]:
        spans: list[Span] = []
        for kind, regex in self._runnable(text):
            spans.extend(_span(kind, match, text) for match in regex.finditer(text))
        return [span for span in spans if span.end > span.start]
