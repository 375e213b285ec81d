"""Stop reasons both ways: an answer that one of the client's stop sequences ended is
Anthropic's `stop_reason: "stop_sequence"` (the sequence named) on `/v1/messages`, `stop` on
chat completions and `completed` on the Responses API, whichever upstream wrote it, when the
upstream says which sequence it was (Anthropic does; an OpenAI-compatible server like vLLM
does as a choice's `stop_reason`). An upstream that does not say (OpenAI's own API) ends the
turn plainly: the node does not guess.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest

from adapters.anthropic import AnthropicAdapter
from adapters.events import Finish
from adapters.http import UpstreamClient
from adapters.types import ChatCompletion, ChatResult, Choice, ResponseMessage, Upstream, Usage
from node.gateway.pipeline import StreamEnd
from node.ingress.anthropic_render import MessageStreamRenderer, message_body
from node.provision import create_node
from tests.calls import chat_call
from tests.conftest import NodeDir, RunningNode, run_node
from tests.mocks.anthropic_mock import AnthropicMock
from tests.mocks.openai_mock import OpenAIMock
from tests.mocks.server import serve_app

CLAUDE_KEY = "sk-ant-stop"
ASK = [{"role": "user", "content": "one two END three"}]


class Served:
    def __init__(self, node: RunningNode, vllm: OpenAIMock, claude_url: str) -> None:
        self.node = node
        self.vllm = vllm
        self.claude_url = claude_url


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder: Path = tmp_path_factory.mktemp("stops") / "node"
    _, key = create_node(folder, "stops-node")
    vllm = OpenAIMock(api_key=None, reports_stop=True)
    plain = OpenAIMock(api_key=None)
    claude = AnthropicMock(models=("claude-mock",), api_key=CLAUDE_KEY)
    os.environ["STOPS_TEST_CLAUDE_KEY"] = CLAUDE_KEY
    with serve_app(vllm) as vllm_url, serve_app(plain) as plain_url, serve_app(claude) as c_url:
        directory = NodeDir(folder, key)
        directory.add_config(
            f"""
[[models]]
name = "vllm"
provider = "openai"
base_url = "{vllm_url}/v1"

[[models]]
name = "gpt"
provider = "openai"
base_url = "{plain_url}/v1"

[[models]]
name = "claude"
provider = "anthropic"
model = "claude-mock"
base_url = "{c_url}"
api_key_env = "STOPS_TEST_CLAUDE_KEY"
"""
        )
        with run_node(directory) as node:
            yield Served(node, vllm, c_url)


@pytest.fixture
def messages(served: Served) -> Iterator[anthropic.Anthropic]:
    url, key = served.node.url, served.node.key
    with anthropic.Anthropic(base_url=url, api_key=key, max_retries=0) as client:
        yield client


@pytest.fixture
def chat(served: Served) -> Iterator[openai.OpenAI]:
    url, key = served.node.url, served.node.key
    with openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0) as client:
        yield client


@pytest.mark.parametrize("model", ["vllm", "claude"])
def test_a_stop_sequence_is_anthropics_stop_reason(messages, model):
    reply = messages.messages.create(
        model=model, max_tokens=64, messages=ASK, stop_sequences=["END"]
    )
    assert reply.content[0].text == "mock says: one two"
    assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == "END"
    with messages.messages.stream(
        model=model, max_tokens=64, messages=ASK, stop_sequences=["END"]
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == "END"
    assert final.content[0].text == "mock says: one two"


def test_an_upstream_that_does_not_say_which_ends_the_turn(messages):
    reply = messages.messages.create(
        model="gpt", max_tokens=64, messages=ASK, stop_sequences=["END"]
    )
    assert reply.content[0].text == "mock says: one two"
    assert reply.stop_reason == "end_turn" and reply.stop_sequence is None


def test_a_stop_sequence_that_is_not_the_clients_is_not_believed():
    """An upstream's word for the sequence is untrusted: one the client never sent is not
    reported, on a complete answer or a stream."""
    completion = ChatCompletion(
        "c", "m", [Choice(0, ResponseMessage(content="hi"), "stop")], Usage(1, 1, 2)
    )
    result = ChatResult(completion=completion, usage=Usage(1, 1, 2), stop_sequence="EVIL")
    body = json.loads(message_body(result, "req_1", "m", ["END"]))
    assert body["stop_reason"] == "end_turn" and body["stop_sequence"] is None
    renderer = MessageStreamRenderer("req_1", "m", 1, ["END"])
    rendered = renderer.render(Finish("stop", stop_sequence="EVIL")) + renderer.render(StreamEnd())
    assert b'"stop_reason":"end_turn","stop_sequence":null' in rendered


@pytest.mark.parametrize("model", ["vllm", "claude"])
def test_a_stop_sequence_is_stop_on_chat_and_completed_on_responses(chat, model):
    done = chat.chat.completions.create(model=model, messages=ASK, stop=["END"], max_tokens=64)
    assert done.choices[0].finish_reason == "stop"
    assert done.choices[0].message.content == "mock says: one two"
    streamed = chat.chat.completions.create(
        model=model, messages=ASK, stop=["END"], max_tokens=64, stream=True
    )
    reasons = [
        c.choices[0].finish_reason for c in streamed if c.choices and c.choices[0].finish_reason
    ]
    assert reasons == ["stop"]
    response = chat.responses.create(model=model, input="one two three", max_output_tokens=64)
    assert response.status == "completed"


async def test_the_anthropic_adapter_names_the_stop_sequence(served):
    upstream = Upstream(
        provider="anthropic", model="claude-mock", base_url=served.claude_url, api_key=CLAUDE_KEY
    )
    call = chat_call(messages=ASK, stop=["END"], stream=True)
    async with UpstreamClient() as client:
        adapter = AnthropicAdapter(upstream, client)
        result = await adapter.chat(chat_call(messages=ASK, stop=["END"]))
        assert result.stop_sequence == "END"
        assert result.chat_completion().choices[0].finish_reason == "stop"
        stream = await adapter.open_stream(call)
        try:
            finishes = [event async for event in stream if isinstance(event, Finish)]
        finally:
            await stream.aclose()
    assert finishes == [Finish("stop", stop_sequence="END")]
