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
from typing import Any

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
        self._patterns = _patterns()

    def find(self, text: str) -> list[Span]:
        spans: list[Span] = []
        for kind, pattern in self._patterns:
            spans.extend(_span(kind, match, text) for match in pattern.finditer(text))
        return [span for span in spans if span.end > span.start]
