"""A provider's guardrails on what its peers send (issue 15): alice applies her `peers`
profile to bob's requests, whatever bob's own node does."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.test_federation import LLAMA, answers, cli, invite, make_peer, wait_for

EMAIL = "bob.user@example.org"

ALICE_GUARDRAILS = """
[guardrails]
peers = "for-peers"

[guardrails.profiles.for-peers]
checks = [
  { kind = "secrets", action = "block" },
  { kind = "pii", action = "redact" },
]
"""


def test_the_provider_applies_its_peer_profile(tmp_path: Path) -> None:
    alice = make_peer(tmp_path, "alice", LLAMA, ALICE_GUARDRAILS)
    bob = make_peer(tmp_path, "bob")
    with alice.run() as a, bob.run() as b:
        cli("join", invite(alice), "--data-dir", str(bob.path))
        assert wait_for(lambda: answers(b, "llama3", max_tokens=5))
        client = openai.OpenAI(base_url=b.url + "/v1", api_key=b.key, max_retries=0)
        reply = client.chat.completions.create(
            model="llama3", messages=[{"role": "user", "content": f"write to {EMAIL}"}]
        )
        content = reply.choices[0].message.content or ""
        assert EMAIL not in content and "[EMAIL_REDACTED]" in content
        # Alice's own key has no profile: her own users are not redacted.
        own = openai.OpenAI(base_url=a.url + "/v1", api_key=a.key, max_retries=0)
        mine = own.chat.completions.create(
            model="llama3", messages=[{"role": "user", "content": f"write to {EMAIL}"}]
        )
        assert EMAIL in (mine.choices[0].message.content or "")
        # A secret from the peer is refused by alice; bob's client is told, in OpenAI's shape.
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(
                model="llama3",
                messages=[{"role": "user", "content": "key AKIAIOSFODNN7EXAMPLE"}],
            )
        assert caught.value.status_code == 400
        assert "AKIAIOSFODNN7EXAMPLE" not in str(caught.value)
