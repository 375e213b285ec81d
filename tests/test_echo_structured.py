"""The `echo` model honours what clients ask of a model (structured output, tools, `n`) and
the node names the OpenAI endpoints it does not serve: the official `openai` SDK and
LangChain's `ChatOpenAI`, unchanged, against a real running node."""

from __future__ import annotations

import enum
import json
from collections.abc import Iterator

import jsonschema
import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from node.provision import create_node
from tests.conftest import NodeDir, RunningNode, run_node

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
            "required": ["city", "days"],
        },
    },
}


class Kind(enum.Enum):
    CAT = "cat"
    DOG = "dog"


class Pet(BaseModel):
    name: str
    kind: Kind
    age: int = Field(ge=0, le=30)


class Owner(BaseModel):
    name: str
    email: str | None
    pets: list[Pet]
    nickname: str | None = None


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    folder = tmp_path_factory.mktemp("echo") / "node"
    _, key = create_node(folder, "echo-node")
    with run_node(NodeDir(folder, key)) as running:
        yield running


@pytest.fixture
def client(node: RunningNode) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key=node.key, max_retries=0)


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# --- structured output -----------------------------------------------------------------------


@pytest.mark.parametrize("api", ["chat", "beta"])
def test_parse_returns_the_pydantic_model(client, api):
    completions = client.chat.completions if api == "chat" else client.beta.chat.completions
    reply = completions.parse(model="echo", messages=ask("Ada"), response_format=Owner)
    owner = reply.choices[0].message.parsed
    assert isinstance(owner, Owner)
    assert owner.name == "Ada" and isinstance(owner.pets[0], Pet)
    assert owner.pets[0].kind is Kind.CAT
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens > 0


def test_streamed_parse_returns_the_model(client):
    with client.chat.completions.stream(
        model="echo", messages=ask("Grace"), response_format=Owner
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.parsed == Owner.model_validate_json(
        final.choices[0].message.content
    )
    assert final.choices[0].message.parsed.name == "Grace"


def test_the_same_request_gets_the_same_instance(client):
    answers = {
        client.chat.completions.parse(model="echo", messages=ask("x"), response_format=Owner)
        .choices[0]
        .message.content
        for _ in range(2)
    }
    assert len(answers) == 1


def test_json_object_answers_an_object(client):
    reply = client.chat.completions.create(
        model="echo", messages=ask("hello"), response_format={"type": "json_object"}
    )
    assert json.loads(reply.choices[0].message.content) == {"echo": "hello"}


def test_max_tokens_cuts_structured_output(client):
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(
            model="echo", messages=ask("Ada"), response_format=Owner, max_tokens=3
        )


# --- tools -----------------------------------------------------------------------------------


def test_forced_tool_call_parses(client):
    reply = client.chat.completions.parse(
        model="echo",
        messages=ask("Lyon"),
        tools=[openai.pydantic_function_tool(Pet)],
        tool_choice={"type": "function", "function": {"name": "Pet"}},
    )
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "Pet" and isinstance(call.function.parsed_arguments, Pet)
    assert call.function.parsed_arguments.name == "Lyon"
    assert reply.choices[0].finish_reason == "tool_calls"


def test_required_tool_arguments_validate(client):
    reply = client.chat.completions.create(
        model="echo", messages=ask("Lyon"), tools=[WEATHER_TOOL], tool_choice="required"
    )
    arguments = json.loads(reply.choices[0].message.tool_calls[0].function.arguments)
    jsonschema.validate(arguments, WEATHER_TOOL["function"]["parameters"])
    assert arguments == {"city": "Lyon", "days": 1}


@pytest.mark.parametrize(
    ("text", "calls"), [("call GET_WEATHER for Lyon", True), ("what is the weather?", False)]
)
def test_auto_calls_a_tool_the_message_names(client, text, calls):
    reply = client.chat.completions.create(
        model="echo", messages=ask(text), tools=[WEATHER_TOOL], tool_choice="auto"
    )
    choice = reply.choices[0]
    if calls:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.tool_calls[0].function.name == "get_weather"
    else:
        assert choice.finish_reason == "stop" and choice.message.content == "echo: " + text


# --- n ---------------------------------------------------------------------------------------


def test_n_gives_n_choices(client):
    reply = client.chat.completions.create(model="echo", messages=ask("a b"), n=3)
    assert [choice.index for choice in reply.choices] == [0, 1, 2]
    assert {choice.message.content for choice in reply.choices} == {"echo: a b"}
    assert reply.usage.completion_tokens == 3 * 3


def test_n_streams_each_choice_with_its_index(client):
    stream = client.chat.completions.create(
        model="echo",
        messages=ask("a b"),
        n=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {0: "echo: a b", 1: "echo: a b", 2: "echo: a b"}
    assert finishes == {0: "stop", 1: "stop", 2: "stop"}
    assert usage is not None and usage.completion_tokens == 9


# --- LangChain -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(node, method):
    model = ChatOpenAI(model="echo", base_url=node.url + "/v1", api_key=node.key, max_retries=0)
    owner = model.with_structured_output(Owner, method=method).invoke("Ada")
    assert isinstance(owner, Owner) and owner.name == "Ada"


# --- endpoints the node does not serve -------------------------------------------------------


def test_unsupported_endpoints_are_named(client):
    with pytest.raises(openai.NotFoundError) as speech:
        client.audio.speech.create(model="tts-1", voice="alloy", input="hi")
    assert speech.value.code == "unsupported_endpoint"
    assert speech.value.message.endswith(
        "The endpoint POST /v1/audio/speech is not supported by this node"
    )
    assert speech.value.body == {
        "message": "The endpoint POST /v1/audio/speech is not supported by this node",
        "type": "invalid_request_error",
        "code": "unsupported_endpoint",
        "param": None,
    }
    with pytest.raises(openai.NotFoundError) as files:
        client.files.list()
    assert files.value.body["message"] == "The endpoint GET /v1/files is not supported by this node"


def test_other_404s_keep_their_bodies(client, node):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=ask("x"))
    assert missing.value.code == "model_not_found"
    with node.client() as http:
        outside = http.get("/nowhere")
    assert outside.status_code == 404 and outside.json()["error"]["code"] == "not_found"
