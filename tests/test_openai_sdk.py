"""The official `openai` SDK, unchanged, against a node started with `aihub serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from node.provision import create_node
from tests.conftest import wait_ready
from tests.mocks.openai_mock import OpenAIMock
from tests.mocks.server import free_port, serve_app

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


class Served:
    def __init__(self, url: str, key: str, mock: OpenAIMock) -> None:
        self.url = url
        self.key = key
        self.mock = mock


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder: Path = tmp_path_factory.mktemp("sdk") / "node"
    _, key = create_node(folder, "sdk-node")
    mock = OpenAIMock(api_key="sk-upstream")
    with serve_app(mock) as upstream_url:
        with (folder / "config.toml").open("a") as config:
            config.write(
                f"""
[[models]]
name = "gpt-mock"
provider = "openai"
base_url = "{upstream_url}/v1"
api_key_env = "SDK_TEST_UPSTREAM_KEY"

[[models]]
name = "embed-mock"
provider = "openai"
kind = "embeddings"
base_url = "{upstream_url}/v1"
api_key_env = "SDK_TEST_UPSTREAM_KEY"
"""
            )
        port = free_port()
        aihub = Path(sys.executable).parent / "aihub"
        env = {**os.environ, "SDK_TEST_UPSTREAM_KEY": "sk-upstream"}
        process = subprocess.Popen(
            [str(aihub), "serve", "--data-dir", str(folder), "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, process)
            yield Served(url, key, mock)
        finally:
            process.terminate()
            process.wait(timeout=15)


@pytest.fixture
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key=served.key, max_retries=0)


@pytest.fixture
def async_client(served: Served) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=served.url + "/v1", api_key=served.key, max_retries=0)


def test_sync_chat(client):
    reply = client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "Hello, hub"}]
    )
    assert reply.choices[0].message.content == "echo: Hello, hub"
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage is not None and reply.usage.completion_tokens == 3


def test_raw_response_headers(client):
    raw = client.chat.completions.with_raw_response.create(
        model="echo", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["aihub-request-id"].startswith("req_")
    assert int(raw.headers["aihub-cost-micros"]) > 0
    assert raw.parse().choices[0].message.content == "echo: hi"


def test_sync_stream_with_usage(client):
    stream = client.chat.completions.create(
        model="gpt-mock",
        messages=[{"role": "user", "content": "stream please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "mock says: stream please"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    assert any(c.choices and c.choices[0].finish_reason == "stop" for c in chunks)


async def test_async_chat_and_stream(async_client):
    reply = await async_client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "async hello"}]
    )
    assert reply.choices[0].message.content == "echo: async hello"
    stream = await async_client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "a b c"}], stream=True
    )
    pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    assert "".join(pieces) == "echo: a b c"
    await async_client.close()


def test_tool_calls_pass_through(client, served):
    reply = client.chat.completions.create(
        model="gpt-mock",
        messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=[WEATHER_TOOL],
        tool_choice="auto",
    )
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert reply.choices[0].finish_reason == "tool_calls"
    sent = json.loads(served.mock.script.received[-1].body)
    assert sent["tools"] == [WEATHER_TOOL] and sent["tool_choice"] == "auto"


def test_streamed_tool_calls_reassemble(client):
    stream = client.chat.completions.create(
        model="gpt-mock",
        messages=[{"role": "user", "content": "weather?"}],
        tools=[WEATHER_TOOL],
        stream=True,
    )
    arguments = ""
    names = []
    for chunk in stream:
        for delta_call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if delta_call.function.name:
                names.append(delta_call.function.name)
            arguments += delta_call.function.arguments or ""
    assert names == ["get_weather"] and json.loads(arguments) == {"city": "Paris"}


def test_echo_forced_tool_call(client):
    reply = client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "Lyon"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    # The arguments are an instance of the tool's parameters, its strings the user's message.
    assert json.loads(call.function.arguments) == {"city": "Lyon"}


def test_embeddings_default_base64_and_float(client):
    # The SDK asks for base64 by default and decodes it itself.
    result = client.embeddings.create(model="echo-embed", input=["one", "two"])
    assert len(result.data) == 2 and len(result.data[0].embedding) == 64
    norm = sum(v * v for v in result.data[0].embedding) ** 0.5
    assert abs(norm - 1.0) < 1e-4
    floats = client.embeddings.create(model="echo-embed", input="one", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(result.data[0].embedding, abs=1e-6)
    upstream = client.embeddings.create(model="embed-mock", input="x y")
    assert upstream.usage.prompt_tokens == 2


def test_sdk_errors(client, served):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert missing.value.code == "model_not_found"
    bad_key = openai.OpenAI(base_url=served.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "x"}], temperature=5
        )
    assert bad.value.param == "temperature"


def test_models_listing(client):
    ids = [model.id for model in client.models.list()]
    assert ids == ["echo", "echo-embed", "gpt-mock", "embed-mock"]
    assert client.models.retrieve("echo").owned_by == "sdk-node"
