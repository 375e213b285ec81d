"""What the node keeps of a guarded request holds only what the guardrails let through (issue
15), on a real node over real HTTP with the official `openai` SDK: the interaction log's
request is the body the upstream was sent (after input redaction), its response the answer the
client got (after output redaction), a stored Responses conversation holds the redacted text,
and the log's findings say what was found (check, action, kind, count), never the thing; in
the end no file of the node's data folder holds the email or the secret at all."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from node.provision import create_node
from tests.conftest import NodeDir, RunningNode, run_node
from tests.mocks.openai_mock import OpenAIMock
from tests.mocks.server import serve_app

EMAIL = "mary.major@example.org"
SEEN = "seen.upstream@example.net"
AWS = "AKIAIOSFODNN7EXAMPLE"
GITHUB = "ghp_" + "a1B2c3D4" * 4 + "e5F6"  # a GitHub token's shape, made up
GPT_KEY = "sk-upstream-kept"


def _config(gpt_url: str) -> str:
    return f"""
[[models]]
name = "gpt-mock"
provider = "openai"
base_url = "{gpt_url}/v1"
api_key_env = "GUARDRAILS_KEPT_GPT_KEY"

[[models]]
name = "gpt-cached"
provider = "openai"
model = "gpt-mock"
base_url = "{gpt_url}/v1"
api_key_env = "GUARDRAILS_KEPT_GPT_KEY"

[guardrails]
[guardrails.keys]
kept = "kept"
answers = "answers"
strict = "strict"
redacting = "answers"
rewriting = "kept"

[guardrails.profiles.kept]
checks = [
  {{ kind = "pii", action = "redact", output = true }},
  {{ kind = "secrets", action = "redact", output = true }},
]

[guardrails.profiles.answers]
hold_back = 64
checks = [{{ kind = "pii", action = "redact", input = false, output = true }}]

[guardrails.profiles.strict]
checks = [
  {{ kind = "pii", action = "redact" }},
  {{ kind = "secrets", action = "block" }},
]
"""


class Kept:
    def __init__(self, node: RunningNode, gpt: OpenAIMock, folder: Path) -> None:
        self.node = node
        self.gpt = gpt
        self.folder = folder
        self.keys: dict[str, str] = {}

    def key(self, name: str, **fields: Any) -> str:
        """A key of this name (made once) that keeps interaction logs unless `fields` say."""
        if name not in self.keys:
            with self.node.client() as admin:
                body = {"name": name, "log": True, **fields}
                response = admin.post("/admin/keys", json=body)
                assert response.status_code == 201, response.text
                self.keys[name] = response.json()["key"]
        return self.keys[name]

    def openai(self, name: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.node.url + "/v1", api_key=self.key(name), max_retries=0)

    def entry(self, request_id: str) -> dict[str, Any]:
        with self.node.client() as admin:
            response = admin.get(f"/admin/logs/{request_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def upstream_saw(self) -> str:
        return self.gpt.script.received[-1].body.decode()


@pytest.fixture(scope="module")
def kept(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kept]:
    folder = tmp_path_factory.mktemp("kept") / "node"
    _, key = create_node(folder, "kept")
    gpt = OpenAIMock(api_key=GPT_KEY)
    os.environ["GUARDRAILS_KEPT_GPT_KEY"] = GPT_KEY
    with serve_app(gpt) as gpt_url:
        directory = NodeDir(folder, key)
        directory.add_config(_config(gpt_url))
        directory.set_config(
            "models = []                         # these", 'models = ["gpt-cached"] #'
        )
        with run_node(directory) as node:
            yield Kept(node, gpt, folder)


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _findings(entry: dict[str, Any]) -> set[tuple[str, str, str, str, int]]:
    return {(f["stage"], f["check"], f["action"], f["kind"], f["count"]) for f in entry["findings"]}


def test_the_log_holds_the_request_as_the_upstream_saw_it(kept: Kept) -> None:
    text = f"mail {EMAIL} my key {AWS} and again {EMAIL}"
    reply = kept.openai("kept").chat.completions.with_raw_response.create(
        model="gpt-mock", messages=_user(text)
    )
    assert EMAIL not in kept.upstream_saw() and AWS not in kept.upstream_saw()
    entry = kept.entry(reply.headers["aihub-request-id"])
    dumped = json.dumps(entry)
    assert EMAIL not in dumped and AWS not in dumped
    sent = json.loads(entry["request"])["messages"][0]["content"]
    assert sent == "mail [EMAIL_REDACTED] my key [SECRET_REDACTED] and again [EMAIL_REDACTED]"
    answer = json.loads(entry["response"])["choices"][0]["message"]["content"]
    assert answer == reply.parse().choices[0].message.content
    assert _findings(entry) == {
        ("input", "pii", "redact", "EMAIL_ADDRESS", 2),
        ("input", "secrets", "redact", "AWS Access Key", 1),
    }


def test_the_log_holds_the_answer_as_the_client_got_it(kept: Kept) -> None:
    # An email this profile lets the upstream see (and so the log keep): not the module's.
    client = kept.openai("answers")
    plain = client.chat.completions.with_raw_response.create(
        model="gpt-mock", messages=_user(f"say {SEEN}")
    )
    assert SEEN in kept.upstream_saw()  # this profile checks answers only
    entry = kept.entry(plain.headers["aihub-request-id"])
    # The request is as the upstream saw it: the email was sent, so it is logged.
    assert SEEN in json.loads(entry["request"])["messages"][0]["content"]
    answer = json.loads(entry["response"])["choices"][0]["message"]["content"]
    assert answer == "mock says: say [EMAIL_REDACTED]" == plain.parse().choices[0].message.content
    assert _findings(entry) == {("output", "pii", "redact", "EMAIL_ADDRESS", 1)}

    stream = client.chat.completions.with_raw_response.create(
        model="gpt-mock", messages=_user(f"one {SEEN} two {SEEN} three"), stream=True
    )
    said = "".join(c.choices[0].delta.content or "" for c in stream.parse() if c.choices)
    assert said == "mock says: one [EMAIL_REDACTED] two [EMAIL_REDACTED] three"
    streamed = kept.entry(stream.headers["aihub-request-id"])
    assert json.loads(streamed["response"]) == {"stream_text": said}
    assert _findings(streamed) == {("output", "pii", "redact", "EMAIL_ADDRESS", 2)}


def test_a_blocked_request_is_logged_without_what_blocked_it(kept: Kept) -> None:
    client = kept.openai("strict")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="gpt-mock", messages=_user(f"from {EMAIL}: the token is {GITHUB}")
        )
    assert GITHUB not in str(caught.value.body)
    with kept.node.client() as admin:
        listed = admin.get("/admin/logs", params={"status": "400"}).json()["logs"]
    entry = kept.entry(listed[0]["request_id"])
    dumped = json.dumps(entry)
    assert GITHUB not in dumped and EMAIL not in dumped
    assert "[SECRET_REDACTED]" in entry["request"] and "[EMAIL_REDACTED]" in entry["request"]
    assert _findings(entry) == {
        ("input", "pii", "redact", "EMAIL_ADDRESS", 1),
        ("input", "secrets", "block", "GitHub Token", 1),
    }


def test_a_stored_conversation_holds_the_redacted_text(kept: Kept) -> None:
    client = kept.openai("kept")
    first = client.responses.create(
        model="gpt-mock",
        instructions=f"The user is {EMAIL}",
        input=f"remember {EMAIL} and {AWS}",
    )
    assert EMAIL not in kept.upstream_saw() and AWS not in kept.upstream_saw()
    follow_up = client.responses.create(
        model="gpt-mock", previous_response_id=first.id, input="what did I say?"
    )
    saw = kept.upstream_saw()
    assert "[EMAIL_REDACTED]" in saw and EMAIL not in saw and AWS not in saw
    key = kept.key("kept")
    with httpx.Client(base_url=kept.node.url, timeout=30) as http:
        headers = {"authorization": f"Bearer {key}"}
        for response_id in (first.id, follow_up.id):
            stored = http.get(f"/v1/responses/{response_id}", headers=headers)
            items = http.get(f"/v1/responses/{response_id}/input_items", headers=headers)
            assert stored.status_code == items.status_code == 200
            for body in (stored.text, items.text):
                assert EMAIL not in body and AWS not in body
        assert (
            "[SECRET_REDACTED]"
            in http.get(f"/v1/responses/{first.id}/input_items", headers=headers).text
        )


def test_a_kept_stream_is_the_one_the_client_was_sent(kept: Kept) -> None:
    """Two keys of one tenant share its cache: the stream kept for the one whose profile
    redacts answers is the redacted one, so the other key's hit is redacted too (and the
    cache's store never holds the email: see the last test)."""
    with kept.node.client() as admin:
        tenant = admin.post("/admin/tenants", json={"name": "kept-tenant"}).json()["id"]
    redacting = kept.key("redacting", tenant=tenant, log=False)
    free = kept.key("free", tenant=tenant, log=False)

    def streamed(key: str) -> tuple[str, str]:
        client = openai.OpenAI(base_url=kept.node.url + "/v1", api_key=key, max_retries=0)
        reply = client.chat.completions.with_raw_response.create(
            model="gpt-cached", messages=_user(f"write to {EMAIL} soon"), stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in reply.parse() if c.choices)
        return reply.headers["aihub-cache"], text

    before = len(kept.gpt.script.received)
    assert streamed(redacting) == ("miss", "mock says: write to [EMAIL_REDACTED] soon")
    assert streamed(free) == ("hit", "mock says: write to [EMAIL_REDACTED] soon")
    assert streamed(redacting) == ("hit", "mock says: write to [EMAIL_REDACTED] soon")
    assert len(kept.gpt.script.received) == before + 1
    # A profile that redacts requests makes the same body another request upstream: it is
    # answered apart (and its answer kept apart).
    rewriting = kept.key("rewriting", tenant=tenant, log=False)
    assert streamed(rewriting) == ("miss", "mock says: write to [EMAIL_REDACTED] soon")
    assert streamed(rewriting)[0] == "hit"
    assert len(kept.gpt.script.received) == before + 2


def test_nothing_the_node_keeps_holds_the_email_or_the_secrets(kept: Kept) -> None:
    """Last in this module: every file of the data folder, the SQLite file and its WAL
    included, read as bytes."""
    for chunk in kept.openai("kept").chat.completions.create(
        model="gpt-mock", messages=_user(f"{EMAIL} {AWS}"), stream=True
    ):
        assert not chunk.choices or EMAIL not in (chunk.choices[0].delta.content or "")
    with kept.node.client() as admin:
        assert admin.get("/admin/logs").status_code == 200  # the entries written
        assert admin.get("/admin/audit").status_code == 200  # the audit log flushed
    files = [path for path in kept.folder.rglob("*") if path.is_file()]
    assert any(path.name == "aihub.db" for path in files)
    for path in files:
        data = path.read_bytes()
        for secret in (EMAIL, AWS, GITHUB):
            assert secret.encode() not in data, (path, secret)
