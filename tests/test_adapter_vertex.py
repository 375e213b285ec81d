"""Vertex AI's adapters (Gemini and Anthropic models) against a mock of Vertex's URLs and a
mock OAuth token endpoint that checks the fake service account's signed JWT; the config's
rules for both Google providers; real nodes through the official SDKs."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anthropic
import msgspec
import openai
import pytest

from adapters import build_adapter
from adapters.gemini import GeminiAdapter
from adapters.gemini_request import chat_body
from adapters.http import UpstreamClient
from adapters.types import Upstream, UpstreamError, Usage
from adapters.vertex import VertexAnthropicAdapter, VertexGeminiAdapter, model_url
from node.config import ConfigError, UpstreamSection, parse_config
from tests.calls import body_of, chat_call, chunks, collect, embed_call, last_sent
from tests.conftest import NodeDir, run_node
from tests.mocks.anthropic_mock import OVERLOADED
from tests.mocks.gemini_mock import (
    RESOURCE_EXHAUSTED,
    GeminiMock,
    fake_service_account,
)
from tests.mocks.gemini_mock import _vector as _mock_vector
from tests.mocks.script import Failure
from tests.mocks.server import free_port, serve_app

PROJECT, LOCATION = "mock-project", "us-central1"
PREFIX = f"/v1/projects/{PROJECT}/locations/{LOCATION}/publishers"
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}
WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA},
}


@pytest.fixture(scope="module")
def mock() -> GeminiMock:
    return GeminiMock(api_key=None, project=PROJECT, location=LOCATION)


@pytest.fixture(scope="module")
def base_url(mock: GeminiMock) -> Iterator[str]:
    with serve_app(mock) as url:
        yield url


def write_key(folder: Path, token_uri: str) -> tuple[Path, dict[str, Any], bytes]:
    info, public = fake_service_account(token_uri, PROJECT)
    path = folder / "service-account.json"
    path.write_text(json.dumps(info))
    return path, info, public


@pytest.fixture(scope="module")
def key_file(base_url, mock, tmp_path_factory) -> Path:
    path, info, public = write_key(tmp_path_factory.mktemp("vertex"), base_url + "/token")
    mock.trust(info, public)
    return path


@pytest.fixture(autouse=True)
def fresh_mock(mock: GeminiMock) -> None:
    mock.reset()


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    async with UpstreamClient() as client:
        yield client


def upstream(
    base_url: str, key_file: Path | None, model: str = "gemini-mock", **fields: Any
) -> Upstream:
    fields.setdefault("project", PROJECT)
    fields.setdefault("location", LOCATION)
    return Upstream(
        provider="vertex",
        model=model,
        base_url=base_url,
        credentials_file=str(key_file) if key_file else None,
        **fields,
    )


def vertex(base_url, key_file, client, model="gemini-mock", **fields):
    return build_adapter(upstream(base_url, key_file, model, **fields), client)


# --- URLs and the adapter a model gets --------------------------------------------------------


def test_vertex_urls():
    regional = Upstream(
        provider="vertex", model="gemini-2.5-pro", project="p", location="europe-west4"
    )
    assert model_url(regional, "google", "generateContent") == (
        "https://europe-west4-aiplatform.googleapis.com/v1/projects/p/locations/europe-west4"
        "/publishers/google/models/gemini-2.5-pro:generateContent"
    )
    worldwide = Upstream(
        provider="vertex",
        model="claude-sonnet-4-5@20250929",
        project="p",
        location="global",
        api_version="v1beta1",
    )
    assert model_url(worldwide, "anthropic", "rawPredict") == (
        "https://aiplatform.googleapis.com/v1beta1/projects/p/locations/global"
        "/publishers/anthropic/models/claude-sonnet-4-5@20250929:rawPredict"
    )


def test_the_adapter_follows_the_models_publisher():
    client = UpstreamClient()
    assert (
        type(build_adapter(Upstream(provider="gemini", model="gemini-2.5-flash"), client))
        is GeminiAdapter
    )
    google = build_adapter(
        Upstream(provider="vertex", model="gemini-2.5-flash", project="p", location="l"), client
    )
    claude = build_adapter(
        Upstream(provider="vertex", model="claude-opus-4-1", project="p", location="l"), client
    )
    assert type(google) is VertexGeminiAdapter and type(claude) is VertexAnthropicAdapter


# --- Gemini on Vertex -------------------------------------------------------------------------


async def test_gemini_on_vertex_sends_geminis_body_with_a_service_account_token(
    base_url, key_file, client, mock
):
    call = chat_call(tools=[WEATHER_TOOL], max_tokens=20)
    result = await vertex(base_url, key_file, client).chat(call)
    received = mock.script.received[-1]
    assert received.path == f"{PREFIX}/google/models/gemini-mock:generateContent"
    assert received.headers["authorization"] == f"Bearer {mock.tokens_issued[0]}"
    assert "x-goog-api-key" not in received.headers
    # The very body the Gemini API gets.
    same = chat_body(call, Upstream(provider="gemini", model="gemini-mock", max_output_tokens=4096))
    assert last_sent(mock) == msgspec.json.decode(same)
    message = msgspec.json.decode(body_of(result))["choices"][0]["message"]
    assert message["tool_calls"][0]["function"]["name"] == "get_weather"
    assert mock.token_refusals == 0


async def test_the_token_is_cached_while_it_is_fresh(base_url, key_file, client, mock):
    adapter = vertex(base_url, key_file, client)
    for _ in range(3):
        await adapter.chat(chat_call())
    assert len(mock.tokens_issued) == 1
    # Many calls at once, before any token: one exchange, shared.
    fresh = vertex(base_url, key_file, client)
    await asyncio.gather(*(fresh.chat(chat_call()) for _ in range(5)))
    assert len(mock.tokens_issued) == 2
    tokens = {r.headers["authorization"] for r in mock.script.received[-5:]}
    assert tokens == {f"Bearer {mock.tokens_issued[1]}"}


async def test_a_token_near_its_expiry_is_refreshed_before_use(base_url, key_file, client, mock):
    # A token that lives a minute is inside google-auth's refresh margin from the start, so
    # every call refreshes it before sending: none is ever sent about to lapse.
    mock.token_lifetime = 60
    adapter = vertex(base_url, key_file, client)
    for _ in range(3):
        await adapter.chat(chat_call())
    assert len(mock.tokens_issued) == 3
    sent = [r.headers["authorization"] for r in mock.script.received]
    assert sent == [f"Bearer {token}" for token in mock.tokens_issued]
    assert mock.token_refusals == 0


async def test_a_key_the_token_endpoint_refuses(base_url, client, mock, tmp_path):
    # Same account name, a key of its own that the endpoint does not know.
    stranger, _, _ = write_key(tmp_path, base_url + "/token")
    with pytest.raises(UpstreamError) as caught:
        await vertex(base_url, stranger, client).chat(chat_call())
    error = caught.value
    assert (error.status, error.code, error.retryable) == (502, "upstream_credentials", False)
    assert "invalid_grant" in error.message
    assert mock.token_refusals == 1 and mock.script.received == []


async def test_an_unreachable_token_endpoint_is_retryable(base_url, client, mock, tmp_path):
    dead, _, _ = write_key(tmp_path, f"http://127.0.0.1:{free_port()}/token")
    with pytest.raises(UpstreamError) as caught:
        await vertex(base_url, dead, client).chat(chat_call())
    assert (caught.value.status, caught.value.retryable) == (502, True)
    assert mock.script.received == []


@pytest.mark.parametrize("content", [None, "not json", '{"type": "service_account"}'])
async def test_a_missing_or_broken_key_file(base_url, client, tmp_path, content):
    path = tmp_path / "key.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UpstreamError) as caught:
        await vertex(base_url, path, client).chat(chat_call())
    assert (caught.value.status, caught.value.code, caught.value.retryable) == (
        502,
        "upstream_credentials",
        False,
    )


async def test_application_default_credentials(base_url, key_file, client, mock, monkeypatch):
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
    result = await vertex(base_url, None, client).chat(chat_call())
    assert (
        msgspec.json.decode(body_of(result))["choices"][0]["message"]["content"]
        == "mock says: hi there"
    )
    assert len(mock.tokens_issued) == 1


async def test_gemini_stream_on_vertex(base_url, key_file, client, mock):
    call = chat_call(stream=True, stream_options={"include_usage": True})
    stream = await vertex(base_url, key_file, client).open_stream(call)
    events, error = await collect(stream)
    assert error is None
    assert (
        mock.script.received[-1].path == f"{PREFIX}/google/models/gemini-mock:streamGenerateContent"
    )
    parsed = chunks(events)
    assert "".join(
        c["choices"][0]["delta"].get("content") or "" for c in parsed if c["choices"]
    ) == ("mock says: hi there")
    assert parsed[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}


async def test_vertex_refusals(base_url, key_file, client, mock):
    adapter = vertex(base_url, key_file, client)
    mock.script.fail_next(RESOURCE_EXHAUSTED)
    with pytest.raises(UpstreamError) as caught:
        await adapter.chat(chat_call())
    assert (caught.value.status, caught.value.retryable, caught.value.retry_after) == (
        429,
        True,
        7.0,
    )
    # Another project than the account may use: Google's 403, the deployment's fault.
    with pytest.raises(UpstreamError) as caught:
        await vertex(base_url, key_file, client, project="other-project").chat(chat_call())
    assert (caught.value.status, caught.value.code, caught.value.retryable) == (
        502,
        "permission_denied",
        False,
    )


async def test_embeddings_on_vertex_are_predict(base_url, key_file, client, mock):
    adapter = vertex(base_url, key_file, client, model="gemini-embed-mock")
    result = await adapter.embed(embed_call(input=["one two", "three"], dimensions=4))
    assert mock.script.received[-1].path == f"{PREFIX}/google/models/gemini-embed-mock:predict"
    assert last_sent(mock) == {
        "instances": [{"content": "one two"}, {"content": "three"}],
        "parameters": {"outputDimensionality": 4},
    }
    # Vertex counts each input's tokens: no estimate.
    assert result.usage == Usage(3, 0, 3) and not result.usage_estimated
    assert [len(e.embedding) for e in result.embedding_list().data] == [4, 4]


# --- Anthropic on Vertex ----------------------------------------------------------------------


async def test_claude_on_vertex_is_raw_predict_with_the_version_in_the_body(
    base_url, key_file, client, mock
):
    adapter = vertex(base_url, key_file, client, model="claude-mock", max_output_tokens=64)
    call = chat_call(
        messages=[{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello"}]
    )
    call.forward_headers = {
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "some-feature-2025",
    }
    result = await adapter.chat(call)
    received = mock.script.received[-1]
    assert received.path == f"{PREFIX}/anthropic/models/claude-mock:rawPredict"
    assert received.headers["authorization"].startswith("Bearer ya29.mock")
    # The client's version is not Vertex's: only its beta features pass, as a header.
    assert "anthropic-version" not in received.headers and "x-api-key" not in received.headers
    assert received.headers["anthropic-beta"] == "some-feature-2025"
    assert last_sent(mock) == {
        "anthropic_version": "vertex-2023-10-16",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
        "system": "be kind",
    }
    body = msgspec.json.decode(body_of(result))
    assert body["choices"][0]["message"]["content"] == "mock says: hello"
    assert body["model"] == "claude-mock"
    # The mock counts the system words too: 2 + (1 + 3).
    assert result.usage == Usage(6, 3, 9)


async def test_claude_stream_on_vertex_with_tool_calls(base_url, key_file, client, mock):
    adapter = vertex(base_url, key_file, client, model="claude-mock")
    stream = await adapter.open_stream(chat_call(stream=True, tools=[WEATHER_TOOL]))
    events, error = await collect(stream)
    assert error is None
    assert (
        mock.script.received[-1].path == f"{PREFIX}/anthropic/models/claude-mock:streamRawPredict"
    )
    assert last_sent(mock)["stream"] is True
    parsed = chunks(events)
    pieces = [c for p in parsed for c in p["choices"][0]["delta"].get("tool_calls", [])]
    assert pieces[0]["function"]["name"] == "get_weather"
    assert msgspec.json.decode("".join(p["function"]["arguments"] for p in pieces)) == {
        "city": "Paris"
    }
    assert parsed[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize(
    ("failure", "status", "code", "retryable", "wait"),
    [
        # Vertex's quota, in Google's shape; the model's overload, in Anthropic's.
        (RESOURCE_EXHAUSTED, 429, "rate_limit_exceeded", True, 7.0),
        (OVERLOADED, 502, "overloaded_error", True, None),
    ],
)
async def test_claude_on_vertex_reads_both_error_shapes(
    base_url, key_file, client, mock, failure, status, code, retryable, wait
):
    mock.script.fail_next(failure)
    with pytest.raises(UpstreamError) as caught:
        await vertex(base_url, key_file, client, model="claude-mock").chat(chat_call())
    error = caught.value
    assert (error.status, error.code, error.retryable, error.retry_after) == (
        status,
        code,
        retryable,
        wait,
    )


# --- config -----------------------------------------------------------------------------------

HEAD = '[node]\nname = "n"\n'


@pytest.mark.parametrize(
    ("deployment", "problem"),
    [
        ('provider = "vertex"\nmodel = "gemini-2.5-pro"', "vertex needs project and location"),
        ('provider = "vertex"\nproject = "p"', "vertex needs project and location"),
        ('provider = "gemini"', "gemini needs api_key_env"),
        ('provider = "openai"\nproject = "p"', "project are for provider vertex only"),
        (
            'provider = "gemini"\napi_key_env = "K"\ncredentials_file = "/k.json"',
            "credentials_file are for provider vertex only",
        ),
        (
            'provider = "vertex"\nkind = "embeddings"\nmodel = "claude-x"\n'
            'project = "p"\nlocation = "l"',
            "Anthropic models on vertex serve no embeddings",
        ),
        ('provider = "vertex"\nproject = "p/../x"\nlocation = "l"', "project"),
        ('provider = "vertex"\nproject = "p"\nlocation = "us central"', "location"),
    ],
)
def test_config_rules(deployment, problem):
    with pytest.raises(ConfigError) as caught:
        parse_config(f'{HEAD}[[models]]\nname = "m"\n{deployment}\n'.encode())
    assert problem in str(caught.value)


def test_config_of_both_google_providers():
    config = parse_config(
        (
            HEAD
            + '[[models]]\nname = "g"\nprovider = "gemini"\nmodel = "gemini-2.5-flash"\n'
            + 'api_key_env = "K"\n'
            + '[[models]]\nname = "v"\nprovider = "vertex"\nmodel = "claude-sonnet-4-5"\n'
            + 'project = "my-project"\nlocation = "global"\ncredentials_file = "~/sa.json"\n'
        ).encode()
    )
    built = config.models[1].upstream(UpstreamSection(), {})
    assert (built.provider, built.project, built.location) == ("vertex", "my-project", "global")
    assert built.credentials_file == str(Path("~/sa.json").expanduser())
    assert config.models[0].upstream(UpstreamSection(), {"K": "key"}).api_key == "key"


# --- through a real node ----------------------------------------------------------------------


def test_vertex_through_a_node(node_dir: NodeDir, base_url, key_file, mock):
    node_dir.add_config(
        f"""
[[models]]
name = "gemini-vertex"
provider = "vertex"
model = "gemini-mock"
base_url = "{base_url}"
project = "{PROJECT}"
location = "{LOCATION}"
credentials_file = "{key_file}"
price_in = 1_250_000
price_out = 10_000_000

[[models]]
name = "claude-vertex"
provider = "vertex"
model = "claude-mock"
base_url = "{base_url}"
project = "{PROJECT}"
location = "{LOCATION}"
credentials_file = "{key_file}"
price_in = 3_000_000
price_out = 15_000_000
"""
    )
    hello = [{"role": "user", "content": "hello there"}]
    with run_node(node_dir) as node:
        sdk = openai.OpenAI(base_url=node.url + "/v1", api_key=node.key, max_retries=0)
        for model in ("gemini-vertex", "claude-vertex"):
            reply = sdk.chat.completions.create(model=model, messages=hello)
            assert reply.choices[0].message.content == "mock says: hello there"
            stream = sdk.chat.completions.create(model=model, messages=hello, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == (
                "mock says: hello there"
            )
        claude = anthropic.Anthropic(base_url=node.url, api_key=node.key, max_retries=0)
        message = claude.messages.create(model="claude-vertex", max_tokens=50, messages=hello)
        assert message.content[0].text == "mock says: hello there"
        response = sdk.responses.create(model="gemini-vertex", input="hello there")
        assert response.output_text == "mock says: hello there"
    # One token per deployment, each fetched once and reused.
    assert len(mock.tokens_issued) == 2 and mock.token_refusals == 0


def test_the_templates_google_examples_parse_uncommented():
    from node.config import render_template

    template = render_template("n")
    start = template.index("# --- Google Gemini API")
    lines = [line.removeprefix("# ") for line in template[start:].splitlines()]
    toml = [line for line in lines if re.match(r"(\[\[models\]\]$|[a-z_]+ = )", line)]
    uncommented = template[:start] + "\n".join(toml)
    config = parse_config(uncommented.encode())
    google = [(d.name, d.provider) for d in config.models if d.provider in ("gemini", "vertex")]
    assert google == [
        ("gemini-flash", "gemini"),
        ("gemini-embedding", "gemini"),
        ("gemini-pro", "vertex"),
        ("claude-sonnet-vertex", "vertex"),
    ]


async def test_a_hanging_token_endpoint_is_bounded_by_the_attempts_deadline(client, tmp_path):
    from adapters.http import ATTEMPT_DEADLINE

    async def never_answers(scope: dict, receive: Any, send: Any) -> None:
        await asyncio.sleep(3600)

    with serve_app(never_answers) as url:
        path, _, _ = write_key(tmp_path, url + "/token")
        adapter = vertex(url, path, client)
        token = ATTEMPT_DEADLINE.set(asyncio.get_running_loop().time() + 0.5)
        try:
            with pytest.raises(UpstreamError) as caught:
                await adapter.chat(chat_call())
        finally:
            ATTEMPT_DEADLINE.reset(token)
    assert (caught.value.status, caught.value.retryable) == (502, True)
    assert "TimeoutError" in caught.value.message


def test_config_check_names_a_missing_key_file(tmp_path, key_file):
    from node.config import missing_secrets

    config = parse_config(
        (
            HEAD + f'[[models]]\nname = "a"\nprovider = "vertex"\nproject = "p"\nlocation = "l"\n'
            f'credentials_file = "{key_file}"\n'
            + f'[[models]]\nname = "b"\nprovider = "vertex"\nproject = "p"\nlocation = "l"\n'
            f'credentials_file = "{tmp_path / "gone.json"}"\n'
        ).encode()
    )
    assert missing_secrets(config, {}) == [
        f"models[1] (b): credentials_file {tmp_path / 'gone.json'} is not a file"
    ]


def test_the_readmes_google_example_parses():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Google Gemini API and Vertex AI") :]
    example = section[section.index("```toml\n") + 8 : section.index("```\n", 8)]
    config = parse_config((HEAD + example).encode())
    assert [d.provider for d in config.models] == ["gemini", "vertex"]


async def test_gemini_embedding_models_take_one_input_a_call(base_url, key_file, client, mock):
    adapter = vertex(base_url, key_file, client, model="gemini-embedding-mock")
    texts = [f"text {n}" for n in range(20)]
    result = await adapter.embed(embed_call(input=texts))
    sent = [msgspec.json.decode(r.body)["instances"] for r in mock.script.received]
    assert len(sent) == 20 and all(len(instances) == 1 for instances in sent)
    assert sorted(i[0]["content"] for i in sent) == sorted(texts)
    # In the inputs' order, whatever order the calls were answered in.
    vectors = [e.embedding for e in result.embedding_list().data]
    assert vectors == [_mock_vector(text, None) for text in texts]
    assert result.usage.prompt_tokens == 40 and not result.usage_estimated
    mock.script.fail_next(Failure(200, b'{"predictions": []}'))
    with pytest.raises(UpstreamError) as caught:
        await adapter.embed(embed_call(input=["a"]))
    assert caught.value.status == 502 and "0 embeddings for 1 inputs" in caught.value.message


async def test_a_token_endpoint_in_trouble_is_retryable(base_url, client, mock, tmp_path):
    async def overloaded(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 503, "headers": []})
        await send({"type": "http.response.body", "body": b'{"error": "temporarily_unavailable"}'})

    with serve_app(overloaded) as url:
        path, _, _ = write_key(tmp_path, url + "/token")
        with pytest.raises(UpstreamError) as caught:
            await vertex(base_url, path, client).chat(chat_call())
    assert (caught.value.status, caught.value.code, caught.value.retryable) == (
        502,
        "upstream_credentials",
        True,
    )
    assert mock.script.received == []
