"""LangChain's chat models, unchanged, against real nodes: `ChatOpenAI(use_responses_api=True)`
(the Responses API) and `ChatAnthropic` (the Messages API), each served by a local echo
deployment and through a peer.

Through a peer the consumer (bob) has no deployment of the model: he calls alice, who serves it
with echo. Every call is accounted as any other: both nodes record its usage and bob keeps
alice's signed receipt; the cap alice gave bob holds for both clients.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import anthropic
import openai
import pytest
from langchain_anthropic import ChatAnthropic
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from node.config import DATABASE_FILE
from node.provision import create_node
from tests.conftest import NodeDir, RunningNode, run_node
from tests.test_federation import (
    LLAMA,
    Peer,
    cli,
    invite,
    make_peer,
    model_owners,
    usage_rows,
    wait_for,
)

PROMPT = "Hello, hub"


@tool
def get_weather(city: str) -> str:
    """Weather in a city."""
    return f"sunny in {city}"


class Weather(BaseModel):
    city: str
    degrees: int


@dataclass(frozen=True)
class Counts:
    served: int  # usage rows of the node that ran the model
    consumed: int  # usage rows of the consumer's peer deployment (0 locally)
    receipts: int  # receipts the consumer keeps (0 locally)


@dataclass
class Target:
    """Where a client points: a node, the model it asks for, and how its calls are counted."""

    node: RunningNode
    model: str
    provider: Peer | None = None  # through a peer: who serves the model

    def counts(self) -> Counts:
        if self.provider is None:
            return Counts(_ok(self.node.dir.path), 0, 0)
        consumed = [
            r for r in usage_rows(self.node.dir.path) if r.deployment == f"{self.model}@alice"
        ]
        return Counts(_ok(self.provider.path), len(consumed), _receipts(self.node))

    def assert_accounted(self, before: Counts, calls: int) -> None:
        """Each of `calls` more calls was charged where it ran; through a peer the consumer
        recorded it too and holds the provider's receipt."""
        if self.provider is None:
            expected = Counts(before.served + calls, 0, 0)
        else:
            expected = Counts(
                before.served + calls, before.consumed + calls, before.receipts + calls
            )
        assert wait_for(lambda: self.counts() == expected), (self.counts(), expected)


def _ok(path) -> int:  # type: ignore[no-untyped-def]
    return len([r for r in usage_rows(path) if r.status == 200])


def _receipts(node: RunningNode) -> int:
    with sqlite3.connect(node.dir.path / DATABASE_FILE) as db:
        return db.execute("SELECT count(*) FROM receipts").fetchone()[0]


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    folder = tmp_path_factory.mktemp("langchain") / "node"
    _, key = create_node(folder, "langchain-node")
    with run_node(NodeDir(folder, key)) as node:
        yield Target(node, "echo")


@pytest.fixture(scope="module")
def through_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    folder = tmp_path_factory.mktemp("langchain-peers")
    alice = make_peer(folder, "alice", LLAMA)
    bob = make_peer(folder, "bob")
    with ExitStack() as stack:
        stack.enter_context(alice.run())
        b = stack.enter_context(bob.run())
        cli("join", invite(alice, "--models", "llama3"), "--data-dir", str(bob.path))
        assert wait_for(lambda: model_owners(b).get("llama3") == "alice")
        yield Target(b, "llama3", alice)


@pytest.fixture(params=["local", "through_peer"])
def target(request: pytest.FixtureRequest) -> Target:
    return request.getfixturevalue(request.param)


def responses_model(target: Target) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=target.node.url + "/v1",
        api_key=target.node.key,
        model=target.model,
        use_responses_api=True,
        max_retries=0,
    )


def anthropic_model(target: Target) -> ChatAnthropic:
    return ChatAnthropic(
        base_url=target.node.url,
        api_key=target.node.key,
        model=target.model,
        max_tokens=64,
        max_retries=0,
    )


MODELS = {"responses": responses_model, "anthropic": anthropic_model}


@pytest.fixture(params=sorted(MODELS))
def surface(request: pytest.FixtureRequest) -> str:
    return request.param


def chat_model(surface: str, target: Target) -> BaseChatModel:
    return MODELS[surface](target)


def test_invoke(target: Target, surface: str) -> None:
    before = target.counts()
    reply = chat_model(surface, target).invoke(PROMPT)
    assert isinstance(reply, AIMessage)
    assert reply.text == f"echo: {PROMPT}"
    assert reply.usage_metadata is not None and reply.usage_metadata["output_tokens"] == 3
    target.assert_accounted(before, 1)


def test_stream(target: Target, surface: str) -> None:
    before = target.counts()
    chunks = list(chat_model(surface, target).stream(PROMPT))
    assert len(chunks) > 1
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk
    assert whole.text == f"echo: {PROMPT}"
    assert whole.usage_metadata is not None and whole.usage_metadata["output_tokens"] == 3
    target.assert_accounted(before, 1)


def test_bind_tools_calls_the_named_tool(target: Target, surface: str) -> None:
    """Echo calls a tool the last user message names, with arguments that fit its schema."""
    before = target.counts()
    model = chat_model(surface, target).bind_tools([get_weather])
    reply = model.invoke("What does get_weather say for Paris?")
    assert isinstance(reply, AIMessage)
    (called,) = reply.tool_calls
    assert called["name"] == "get_weather"
    assert isinstance(called["args"]["city"], str)
    assert get_weather.invoke(called["args"]).startswith("sunny in")
    target.assert_accounted(before, 1)


def test_with_structured_output_over_responses(target: Target) -> None:
    """`with_structured_output` sends the schema as `text.format`: echo answers an instance."""
    before = target.counts()
    weather = responses_model(target).with_structured_output(Weather).invoke("Paris, warm")
    assert isinstance(weather, Weather)
    target.assert_accounted(before, 1)


def test_the_peers_cap_holds_for_both_clients(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Alice's cap for bob ($0.002 at $1 per 1M tokens each way) is one cap whatever API bob's
    clients speak: both work within it, with their receipts, and both are refused past it."""
    folder = tmp_path_factory.mktemp("langchain-cap")
    alice = make_peer(folder, "alice", LLAMA)
    bob = make_peer(folder, "bob")
    with ExitStack() as stack:
        stack.enter_context(alice.run())
        b = stack.enter_context(bob.run())
        token = invite(alice, "--models", "llama3", "--cap", "0.002")
        cli("join", token, "--data-dir", str(bob.path))
        assert wait_for(lambda: model_owners(b).get("llama3") == "alice")
        target = Target(b, "llama3", alice)
        # An output cap each: a cap admits only what it could pay at worst.
        clients = [
            ChatOpenAI(
                base_url=b.url + "/v1",
                api_key=b.key,
                model="llama3",
                use_responses_api=True,
                max_tokens=64,
                max_retries=0,
            ),
            ChatAnthropic(
                base_url=b.url, api_key=b.key, model="llama3", max_tokens=64, max_retries=0
            ),
        ]
        before = target.counts()
        for client in clients:
            assert client.invoke(PROMPT).text == f"echo: {PROMPT}"
        target.assert_accounted(before, 2)
        long = " ".join(["word"] * 200)
        for client, refusal in zip(
            clients, (openai.RateLimitError, anthropic.RateLimitError), strict=True
        ):
            assert _refused_within(client, long, refusal)
    spent = [r.cost_micros for r in usage_rows(alice.path) if r.status == 200]
    assert 0 < sum(spent) <= 2000
    assert _receipts(b) == len(spent)


def _refused_within(client: BaseChatModel, prompt: str, refusal: type[Exception]) -> bool:
    """Whether the client is refused by the cap within a few calls (then again at once)."""
    for _ in range(20):
        try:
            client.invoke(prompt)
        except refusal:
            break
    else:
        return False
    try:
        client.invoke(prompt)
    except refusal:
        return True
    return False
