"""Moderation through a configured deployment (issue 15) on a real node over real HTTP, with
the official `openai` and `anthropic` SDKs and a mock of OpenAI's `/v1/moderations`: what it
flags in a request or an answer (complete, or streamed: assessed whole before the stream's
end, which a block replaces with the API's error event) blocks or is logged,
`/v1/moderations` adds its categories to the node's own checks, and a deployment that
stalls, trickles, floods or garbles its answer gives the configured fail mode, never a 500
or a hang."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from node.provision import create_node
from tests.conftest import NodeDir, RunningNode, run_node
from tests.mocks.moderation_mock import ModerationMock
from tests.mocks.openai_mock import OpenAIMock
from tests.mocks.server import serve_app

MOD_KEY = "sk-moderation-upstream"
GPT_KEY = "sk-gpt-upstream-mod"


# A check that moderates answers only.
_ANSWERS = 'kind = "moderation", deployment = "moderator", input = false, output = true'


def _config(gpt_url: str, mod_url: str) -> str:
    return f"""
[[models]]
name = "gpt-mock"
provider = "openai"
base_url = "{gpt_url}/v1"
api_key_env = "MODERATION_TEST_GPT_KEY"

[[models]]
name = "gpt-cached"
provider = "openai"
model = "gpt-mock"
base_url = "{gpt_url}/v1"
api_key_env = "MODERATION_TEST_GPT_KEY"

[[models]]
name = "moderator"
provider = "openai"
kind = "moderations"
model = "omni-moderation-latest"
base_url = "{mod_url}/v1"
api_key_env = "MODERATION_TEST_MOD_KEY"

[guardrails]
[guardrails.keys]
closed = "closed"
open = "open"
logged = "logged"
violence = "violence"
answers = "answers"
answers_logged = "answers"
tenant_answers = "answers"
answers_closed = "answers_closed"
answers_open = "answers_open"
answers_redacted = "answers_redacted"

[guardrails.profiles.closed]
checks = [
  {{ kind = "pii", action = "redact" }},
  {{ kind = "moderation", deployment = "moderator", timeout = 1, on_error = "block" }},
]

[guardrails.profiles.open]
checks = [{{ kind = "moderation", deployment = "moderator", timeout = 1, on_error = "allow" }}]

[guardrails.profiles.logged]
checks = [{{ kind = "moderation", deployment = "moderator", action = "log" }}]

[guardrails.profiles.violence]
checks = [{{ kind = "moderation", deployment = "moderator", categories = ["violence"] }}]

[guardrails.profiles.answers]
checks = [{{ kind = "moderation", deployment = "moderator", input = false, output = true }}]

[guardrails.profiles.answers_closed]
checks = [{{ {_ANSWERS}, timeout = 1, on_error = "block" }}]

[guardrails.profiles.answers_open]
checks = [{{ {_ANSWERS}, timeout = 1, on_error = "allow" }}]

[guardrails.profiles.answers_redacted]
checks = [
  {{ kind = "pii", action = "redact", input = false, output = true }},
  {{ kind = "moderation", deployment = "moderator", input = false, output = true }},
]
"""


class Moderated:
    def __init__(self, node: RunningNode, gpt: OpenAIMock, mod: ModerationMock) -> None:
        self.node = node
        self.gpt = gpt
        self.mod = mod
        self.keys: dict[str, str] = {}

    def client(self, name: str, **fields: Any) -> openai.OpenAI:
        if name not in self.keys:
            with self.node.client() as admin:
                response = admin.post("/admin/keys", json={"name": name, **fields})
                assert response.status_code == 201, response.text
                self.keys[name] = response.json()["key"]
        return openai.OpenAI(
            base_url=self.node.url + "/v1", api_key=self.keys[name], max_retries=0, timeout=30
        )

    def chat(self, name: str, text: str) -> Any:
        return self.client(name).chat.completions.create(
            model="gpt-mock", messages=[{"role": "user", "content": text}]
        )


@pytest.fixture(scope="module")
def moderated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moderated]:
    folder: Path = tmp_path_factory.mktemp("moderation") / "node"
    _, key = create_node(folder, "moderated")
    gpt, mod = OpenAIMock(api_key=GPT_KEY), ModerationMock(api_key=MOD_KEY)
    os.environ["MODERATION_TEST_GPT_KEY"] = GPT_KEY
    os.environ["MODERATION_TEST_MOD_KEY"] = MOD_KEY
    with serve_app(gpt) as gpt_url, serve_app(mod) as mod_url:
        directory = NodeDir(folder, key)
        directory.add_config(_config(gpt_url, mod_url))
        directory.set_config(
            "models = []                         # these", 'models = ["gpt-cached"] #'
        )
        with run_node(directory) as node:
            yield Moderated(node, gpt, mod)


def test_a_flagged_request_is_blocked_before_any_upstream(moderated: Moderated) -> None:
    asked = len(moderated.gpt.script.received)
    with pytest.raises(openai.BadRequestError) as caught:
        moderated.chat("closed", "I hate you, write to jane@example.com")
    assert caught.value.code == "guardrail_blocked"
    assert "`moderation`" in caught.value.message and "harassment" in caught.value.message
    assert len(moderated.gpt.script.received) == asked
    # The deployment was asked in OpenAI's format, with its key, the text already redacted.
    sent = moderated.mod.script.received[-1]
    assert sent.path == "/v1/moderations" and sent.headers["authorization"] == f"Bearer {MOD_KEY}"
    body = json.loads(sent.body)
    assert body["model"] == "omni-moderation-latest"
    assert body["input"] == ["I hate you, write to [EMAIL_REDACTED]"]
    reply = moderated.chat("closed", "what a fine day")
    assert reply.choices[0].message.content == "mock says: what a fine day"


def test_a_flagged_messages_request_is_refused_in_anthropic_shape(moderated: Moderated) -> None:
    moderated.client("closed")
    client = anthropic.Anthropic(
        base_url=moderated.node.url, api_key=moderated.keys["closed"], max_retries=0
    )
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(
            model="gpt-mock", max_tokens=16, messages=[{"role": "user", "content": "I hate you"}]
        )
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert "harassment" in body["error"]["message"]


def test_only_the_categories_a_check_names_count(moderated: Moderated) -> None:
    assert moderated.chat("violence", "I hate you").choices[0].message.content
    with pytest.raises(openai.BadRequestError) as caught:
        moderated.chat("violence", "go hurt them")
    assert "violence" in caught.value.message and "harassment" not in caught.value.message


def test_a_log_check_only_records_what_it_flags(moderated: Moderated) -> None:
    client = moderated.client("logged", log=True)
    reply = client.chat.completions.with_raw_response.create(
        model="gpt-mock", messages=[{"role": "user", "content": "I hate you"}]
    )
    assert reply.parse().choices[0].message.content == "mock says: I hate you"
    with moderated.node.client() as admin:
        entry = admin.get(f"/admin/logs/{reply.headers['aihub-request-id']}").json()
        metrics = admin.get("/metrics").text
    assert entry["findings"] == [
        {
            "stage": "input",
            "check": "moderation",
            "action": "log",
            "kind": "harassment",
            "count": 1,
        }
    ]
    assert 'action="log",check="moderation",stage="input"' in metrics


def test_a_flagged_answer_is_withheld(moderated: Moderated) -> None:
    # This profile moderates answers only: the mock repeats the question in its answer.
    with pytest.raises(openai.BadRequestError) as caught:
        moderated.chat("answers", "say I hate you")
    assert "answer was withheld" in caught.value.message
    assert "harassment" in caught.value.message
    assert moderated.chat("answers", "say hello").choices[0].message.content


def _streamed(client: openai.OpenAI, text: str) -> tuple[str, list[Any], Exception | None]:
    """A streamed chat answer read until it ends: its text, its finish reasons, and the
    error the SDK raised at its end (None if it ended well)."""
    said, finishes = "", []
    stream = client.chat.completions.create(
        model="gpt-mock",
        messages=[{"role": "user", "content": text}],
        stream=True,
        stream_options={"include_usage": True},
    )
    try:
        for chunk in stream:
            for choice in chunk.choices:
                said += choice.delta.content or ""
                if choice.finish_reason:
                    finishes.append(choice.finish_reason)
    except openai.APIError as exc:
        return said, finishes, exc
    return said, finishes, None


def test_a_flagged_streamed_answer_ends_with_the_error_event(moderated: Moderated) -> None:
    said, finishes, error = _streamed(moderated.client("answers"), "say I hate you")
    # The text streamed as it came; the end (its finish, its usage) is the block instead.
    assert said == "mock says: say I hate you" and finishes == []
    assert error is not None and "answer was withheld" in error.message
    assert "harassment" in error.message
    sent = json.loads(moderated.mod.script.received[-1].body)
    assert sent["input"] == ["mock says: say I hate you"]
    said, finishes, error = _streamed(moderated.client("answers"), "say hello")
    assert error is None and finishes == ["stop"] and said == "mock says: say hello"


def test_a_withheld_stream_is_what_its_usage_record_and_log_say(moderated: Moderated) -> None:
    client = moderated.client("answers_logged", log=True)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-mock", messages=[{"role": "user", "content": "I hate you"}], stream=True
    )
    with pytest.raises(openai.APIError):
        for _ in raw.parse():
            pass
    request_id = raw.headers["aihub-request-id"]
    with moderated.node.client() as admin:
        entry = admin.get(f"/admin/logs/{request_id}").json()
        metrics = admin.get("/metrics").text
    assert entry["status"] == 400, entry
    assert {"stage": "output", "check": "moderation", "action": "block"}.items() <= (
        entry["findings"][0].items()
    )
    assert 'action="block",check="moderation",stage="output"' in metrics


def test_a_flagged_streamed_messages_answer_ends_with_anthropic_s_error(
    moderated: Moderated,
) -> None:
    client = anthropic.Anthropic(
        base_url=moderated.node.url, api_key=_key(moderated, "answers"), max_retries=0
    )
    said = ""
    with (
        pytest.raises(anthropic.APIStatusError) as caught,
        client.messages.stream(
            model="gpt-mock", max_tokens=64, messages=[{"role": "user", "content": "I hate you"}]
        ) as stream,
    ):
        for text in stream.text_stream:
            said += text
    assert said == "mock says: I hate you"
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert "answer was withheld" in body["error"]["message"]
    with client.messages.stream(
        model="gpt-mock", max_tokens=64, messages=[{"role": "user", "content": "hello"}]
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "end_turn" and final.content[0].text == "mock says: hello"


def test_a_kept_stream_replayed_to_a_moderated_key_is_withheld(moderated: Moderated) -> None:
    # Two keys of one tenant share its cache (the profile rewrites nothing): the one with no
    # profile asks first and its answer is kept; the moderated one's hit is the same stream,
    # read by the moderator as a fresh one is.
    with moderated.node.client() as admin:
        created = admin.post("/admin/tenants", json={"name": "mod-shared"})
        assert created.status_code == 201, created.text
    question = [{"role": "user", "content": "I hate you, kept"}]
    plain = moderated.client("tenant_plain", tenant="mod-shared")
    first = plain.chat.completions.create(model="gpt-cached", messages=question, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in first if c.choices)
    guarded = moderated.client("tenant_answers", tenant="mod-shared", log=True)
    raw = guarded.chat.completions.with_raw_response.create(
        model="gpt-cached", messages=question, stream=True
    )
    assert raw.headers["aihub-cache"] == "hit"
    with pytest.raises(openai.APIError) as caught:
        for _ in raw.parse():
            pass
    assert "answer was withheld" in caught.value.message
    with moderated.node.client() as admin:
        entry = admin.get(f"/admin/logs/{raw.headers['aihub-request-id']}").json()
    assert entry["status"] == 400, entry


def test_a_flagged_streamed_response_ends_failed(moderated: Moderated) -> None:
    client = moderated.client("answers")
    events = list(client.responses.create(model="gpt-mock", input="I hate you", stream=True))
    said = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert said == "mock says: I hate you"
    last = events[-1]
    assert last.type == "response.failed" and last.response.error is not None
    assert "answer was withheld" in last.response.error.message
    assert not any(e.type == "response.completed" for e in events)
    clean = list(client.responses.create(model="gpt-mock", input="hello", stream=True))
    assert clean[-1].type == "response.completed"


def test_the_moderator_reads_a_stream_as_the_client_was_sent_it(moderated: Moderated) -> None:
    said, _, error = _streamed(moderated.client("answers_redacted"), "mail jane@example.com")
    assert error is None and said == "mock says: mail [EMAIL_REDACTED]"
    sent = json.loads(moderated.mod.script.received[-1].body)
    assert sent["input"] == ["mock says: mail [EMAIL_REDACTED]"]


@pytest.mark.parametrize(
    "word", ["stall", "trickle", "huge", "garbage", "miscount", "oops", "weird"]
)
def test_a_failing_deployment_fails_a_stream_closed_or_open(
    moderated: Moderated, word: str
) -> None:
    said, finishes, error = _streamed(moderated.client("answers_closed"), f"please {word} now")
    assert said == f"mock says: please {word} now" and finishes == []
    assert error is not None and "moderation deployment did not answer" in error.message
    said, finishes, error = _streamed(moderated.client("answers_open"), f"please {word} now")
    assert error is None and finishes == ["stop"]


@pytest.mark.parametrize(
    "word", ["stall", "trickle", "huge", "garbage", "miscount", "oops", "weird"]
)
def test_a_failing_deployment_fails_closed_or_open(moderated: Moderated, word: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        moderated.chat("closed", f"please {word} now")
    assert "moderation deployment did not answer" in caught.value.message
    assert "<b>" not in caught.value.message
    assert moderated.chat("open", f"please {word} now").choices[0].message.content


def test_moderations_add_the_deployment_s_categories(moderated: Moderated) -> None:
    result = moderated.client("closed").moderations.create(
        input=["I hate you", "mail jane@example.com", "a fine day"]
    )
    hate, email, fine = result.results
    assert hate.flagged and hate.categories.harassment and not hate.categories.violence
    assert hate.category_scores.harassment == pytest.approx(0.97)
    assert email.flagged and email.model_dump()["categories"]["pii"]
    assert not email.categories.harassment
    assert not fine.flagged


def test_moderations_fail_closed_in_openai_shape(moderated: Moderated) -> None:
    closed, open_ = (
        {"authorization": f"Bearer {moderated.keys.get(name) or _key(moderated, name)}"}
        for name in ("closed", "open")
    )
    with httpx.Client(base_url=moderated.node.url, timeout=30) as http:
        refused = http.post("/v1/moderations", headers=closed, json={"input": "oops"})
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "moderation_unavailable"
        # Failing open: the node's own checks alone.
        answered = http.post("/v1/moderations", headers=open_, json={"input": "oops"})
        assert answered.status_code == 200 and not answered.json()["results"][0]["flagged"]


def _key(moderated: Moderated, name: str) -> str:
    moderated.client(name)
    return moderated.keys[name]


def test_the_moderation_deployment_serves_no_chat(moderated: Moderated) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        moderated.client("open").chat.completions.create(
            model="moderator", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.code == "model_not_supported"


def test_a_moderation_check_needs_a_moderations_deployment(tmp_path: Path) -> None:
    from node.config import ConfigError, load_config

    create_node(tmp_path / "n", "n")
    directory = NodeDir(tmp_path / "n", "")
    directory.add_config(
        """
[[models]]
name = "chatty"
provider = "openai"

[guardrails.profiles.p]
checks = [{ kind = "moderation", deployment = "chatty" },
          { kind = "moderation", deployment = "nowhere", action = "redact" }]
"""
    )
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "n")
    message = str(caught.value)
    assert "'chatty' is not a [[models]] entry of kind moderations" in message
    assert "a moderation check blocks or logs" in message
