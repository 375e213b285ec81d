"""The official `openai` SDK against a real node's legacy text completions and image
generations, passed to an OpenAI-compatible mock speaking OpenAI's real format.

Both go through the one pipeline: keys, budgets (the worst case reserved first), usage
records and cost headers as for chat; an upstream's counts are untrusted.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import openai
import pytest

from adapters.anthropic import AnthropicAdapter
from adapters.echo import EchoAdapter
from adapters.ollama import OllamaAdapter
from adapters.types import (
    CompletionCall,
    CompletionRequest,
    ImageCall,
    ImageRequest,
    Upstream,
    UpstreamError,
)
from node.config import ConfigError, load_config
from node.provision import create_node
from tests.conftest import NodeDir, RunningNode, run_node
from tests.mocks.openai_mock import PNG_B64, OpenAIMock
from tests.mocks.server import serve_app

UPSTREAM_KEY = "sk-upstream"
IMAGE_PRICE = 40_000


class Served:
    def __init__(self, node: RunningNode, mock: OpenAIMock, greedy: OpenAIMock) -> None:
        self.node = node
        self.url = node.url
        self.key = node.key
        self.mock = mock
        self.greedy = greedy


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder: Path = tmp_path_factory.mktemp("legacy") / "node"
    _, key = create_node(folder, "legacy-node")
    mock = OpenAIMock(api_key=UPSTREAM_KEY)
    # A hostile upstream: more images than asked, and token counts past any bound.
    huge = {"prompt_tokens": 10**15, "completion_tokens": 10**15, "total_tokens": 1}
    greedy = OpenAIMock(api_key=UPSTREAM_KEY, extra_images=5, completion_usage=huge)
    os.environ["LEGACY_TEST_UPSTREAM_KEY"] = UPSTREAM_KEY
    with serve_app(mock) as url, serve_app(greedy) as greedy_url:
        directory = NodeDir(folder, key)
        directory.add_config(
            f"""
[[models]]
name = "text-mock"
provider = "openai"
kind = "completions"
model = "davinci-upstream"
base_url = "{url}/v1"
api_key_env = "LEGACY_TEST_UPSTREAM_KEY"
price_in = 1_000_000
price_out = 2_000_000
max_output_tokens = 64

[[models]]
name = "image-mock"
provider = "openai"
kind = "images"
model = "dall-e-upstream"
base_url = "{url}/v1"
api_key_env = "LEGACY_TEST_UPSTREAM_KEY"
price_per_image = {IMAGE_PRICE}

[[models]]
name = "text-greedy"
provider = "openai"
kind = "completions"
base_url = "{greedy_url}/v1"
api_key_env = "LEGACY_TEST_UPSTREAM_KEY"
price_in = 1_000_000
price_out = 2_000_000

[[models]]
name = "image-greedy"
provider = "openai"
kind = "images"
base_url = "{greedy_url}/v1"
api_key_env = "LEGACY_TEST_UPSTREAM_KEY"
price_per_image = 1_000

[[models]]
name = "claude"
provider = "anthropic"
base_url = "http://127.0.0.1:9"
"""
        )
        with run_node(directory) as node:
            yield Served(node, mock, greedy)


def sdk(served: Served, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key=key or served.key, max_retries=0)


def new_key(served: Served, **fields: Any) -> tuple[str, str]:
    headers = {"authorization": f"Bearer {served.key}"}
    with httpx.Client(base_url=served.url, headers=headers, timeout=30) as client:
        response = client.post("/admin/keys", json={"name": "k", **fields})
    assert response.status_code == 201, response.text
    body = response.json()
    return body["key"], body["record"]["id"]


def spend_of(served: Served, key_id: str) -> int:
    """What the usage table charged the key (the report flushes what is queued first)."""
    headers = {"authorization": f"Bearer {served.key}"}
    with httpx.Client(base_url=served.url, headers=headers, timeout=30) as client:
        report = client.get("/admin/usage", params={"by": "key", "since": "1h"}).json()
    return sum(row["cost_micros"] for row in report["data"] if row["group"] == key_id)


def last_body(mock: OpenAIMock, suffix: str) -> dict[str, Any]:
    (*_, last) = [r for r in mock.script.received if r.path.endswith(suffix)]
    return msgspec.json.decode(last.body)


# --- text completions -------------------------------------------------------------------------


def test_a_completion_is_passed_through_and_priced_per_token(served):
    key, key_id = new_key(served, budget_micros=1_000_000)
    with sdk(served, key) as client:
        raw = client.completions.with_raw_response.create(
            model="text-mock", prompt="Say this", max_tokens=5, temperature=0.2, suffix="!"
        )
    completion = raw.parse()
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "mock completes: Say this"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (2, 4)
    # 2 tokens in at 1 micro each, 4 out at 2 each.
    assert int(raw.headers["aihub-cost-micros"]) == 10 == spend_of(served, key_id)
    sent = last_body(served.mock, "/v1/completions")
    assert sent["model"] == "davinci-upstream" and sent["max_tokens"] == 5
    assert sent["temperature"] == 0.2 and sent["suffix"] == "!"  # passed through untouched


def test_a_completion_without_max_tokens_gets_openais_default_and_a_cap(served):
    with sdk(served) as client:
        client.completions.create(model="text-mock", prompt="x")
        assert last_body(served.mock, "/v1/completions")["max_tokens"] == 16
        client.completions.create(model="text-mock", prompt="x", max_tokens=10_000)
        assert last_body(served.mock, "/v1/completions")["max_tokens"] == 64


def test_a_streamed_completion_is_openais_chunks_and_charged_per_token(served):
    key, key_id = new_key(served, budget_micros=1_000_000)
    with sdk(served, key) as client:
        chunks = list(
            client.completions.create(
                model="text-mock",
                prompt="Say this",
                max_tokens=5,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    assert all(chunk.object == "text_completion" for chunk in chunks)
    text = "".join(choice.text for chunk in chunks for choice in chunk.choices)
    assert text == "mock completes: Say this"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (2, 4)
    assert spend_of(served, key_id) == 10  # as for the same completion not streamed
    sent = last_body(served.mock, "/v1/completions")
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


def test_a_streamed_completion_without_include_usage_is_counted_all_the_same(served):
    key, key_id = new_key(served, budget_micros=1_000_000)
    with sdk(served, key) as client:
        chunks = list(client.completions.create(model="text-mock", prompt="Say this", stream=True))
    assert all(chunk.usage is None for chunk in chunks)  # not asked for: not sent
    assert "".join(c.choices[0].text for c in chunks) == "mock completes: Say this"
    assert spend_of(served, key_id) == 10


def test_a_streamed_completion_cut_short_is_an_error_event_and_charged(served):
    key, key_id = new_key(served, budget_micros=1_000_000)
    served.mock.script.cut_stream_after = 2
    try:
        body = {"model": "text-mock", "prompt": "Say this", "stream": True}
        headers = {"authorization": f"Bearer {key}"}
        with httpx.stream(
            "POST", f"{served.url}/v1/completions", json=body, headers=headers, timeout=30
        ) as response:
            assert response.status_code == 200
            text = response.read().decode()
    finally:
        served.mock.script.cut_stream_after = None
    events = [block for block in text.strip().split("\n\n")]
    assert len(events) == 3 and "ended early" in events[-1] and "[DONE]" not in text
    assert spend_of(served, key_id) > 0  # what it wrote, estimated


def test_huge_counts_in_a_streamed_completion_are_charged_at_most_the_worst_case(served):
    key, key_id = new_key(served, budget_micros=1_000_000)
    with sdk(served, key) as client:
        list(
            client.completions.create(
                model="text-greedy",
                prompt="hi",
                max_tokens=5,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    assert 0 < spend_of(served, key_id) <= 15


def test_streamed_images_are_refused_plainly(served):
    body = {"model": "image-mock", "prompt": "a fox", "stream": True}
    headers = {"authorization": f"Bearer {served.key}"}
    response = httpx.post(f"{served.url}/v1/images/generations", json=body, headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "stream"


def test_huge_upstream_counts_are_charged_at_most_the_worst_case(served):
    key, key_id = new_key(served, budget_micros=1_000_000)
    with sdk(served, key) as client:
        raw = client.completions.with_raw_response.create(
            model="text-greedy", prompt="hi", max_tokens=5
        )
    # Reserved: the prompt at a token per byte (`"hi"` + 1 = 5) and 5 out: 5 + 10 micros.
    assert int(raw.headers["aihub-cost-micros"]) <= 15
    assert spend_of(served, key_id) <= 15


def test_the_worst_case_counts_every_completion_written(served):
    # best_of 4 at 64 tokens out, 2 micros each: 512 micros at least, past the budget.
    key, _ = new_key(served, budget_micros=300)
    before = len(served.mock.script.received)
    with sdk(served, key) as client, pytest.raises(openai.RateLimitError):
        client.completions.create(model="text-mock", prompt="x", max_tokens=64, best_of=4)
    assert len(served.mock.script.received) == before


# --- images -----------------------------------------------------------------------------------


def test_images_are_generated_and_priced_per_image(served):
    key, key_id = new_key(served, budget_micros=1_000_000)
    with sdk(served, key) as client:
        raw = client.images.with_raw_response.generate(
            model="image-mock", prompt="a red fox", n=2, response_format="b64_json", size="256x256"
        )
    images = raw.parse()
    assert images.data is not None and len(images.data) == 2
    assert images.data[0].b64_json == PNG_B64
    assert int(raw.headers["aihub-cost-micros"]) == 2 * IMAGE_PRICE == spend_of(served, key_id)
    sent = last_body(served.mock, "/v1/images/generations")
    assert sent["model"] == "dall-e-upstream" and sent["size"] == "256x256" and sent["n"] == 2


def test_a_budget_that_cannot_cover_n_images_is_refused_before_the_upstream(served):
    key, key_id = new_key(served, budget_micros=2 * IMAGE_PRICE)
    before = len(served.mock.script.received)
    with sdk(served, key) as client, pytest.raises(openai.RateLimitError) as refused:
        client.images.generate(model="image-mock", prompt="three foxes", n=3)
    assert refused.value.status_code == 429
    assert len(served.mock.script.received) == before
    assert spend_of(served, key_id) == 0


def test_more_images_than_asked_are_charged_as_asked(served):
    key, key_id = new_key(served, budget_micros=1_000_000)
    with sdk(served, key) as client:
        raw = client.images.with_raw_response.generate(model="image-greedy", prompt="fox", n=2)
    assert len(raw.parse().data or ()) == 7  # the upstream's answer, byte for byte
    assert int(raw.headers["aihub-cost-micros"]) == 2 * 1_000 == spend_of(served, key_id)


# --- who serves what --------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["echo", "claude"])
def test_deployments_that_do_not_serve_them_answer_model_not_supported(served, model):
    with sdk(served) as client:
        with pytest.raises(openai.BadRequestError) as text:
            client.completions.create(model=model, prompt="x")
        with pytest.raises(openai.BadRequestError) as image:
            client.images.generate(model=model, prompt="x")
    assert text.value.code == image.value.code == "model_not_supported"


def test_chat_on_a_completions_deployment_is_model_not_supported(served):
    with sdk(served) as client, pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="text-mock", messages=[{"role": "user", "content": "x"}]
        )
    assert refused.value.code == "model_not_supported"


@pytest.mark.parametrize(
    ("deployment", "problem"),
    [
        ('provider = "anthropic"\nkind = "completions"', "anthropic serves no completions"),
        ('provider = "echo"\nkind = "images"', "echo serves no images"),
        ('provider = "openai"\nprice_per_image = 5', "price_per_image is for"),
    ],
)
def test_config_refuses_what_no_upstream_serves(tmp_path, deployment, problem):
    folder = tmp_path / "node"
    create_node(folder, "cfg")
    with (folder / "config.toml").open("a") as config:
        config.write(f'\n[[models]]\nname = "odd"\n{deployment}\n')
    with pytest.raises(ConfigError, match=problem):
        load_config(folder)


@pytest.mark.parametrize("provider", ["echo", "anthropic", "ollama"])
def test_other_adapters_say_they_do_not_serve_them(provider):
    upstream = Upstream(provider=provider, model="m")
    adapter = (
        EchoAdapter(upstream)
        if provider == "echo"
        else {"anthropic": AnthropicAdapter, "ollama": OllamaAdapter}[provider](upstream, None)  # type: ignore[arg-type]
    )
    completion = CompletionCall(CompletionRequest(model="m", prompt="x"), {}, "r1")
    image = ImageCall(ImageRequest(model="m", prompt="x"), {}, "r2")
    for call in (adapter.complete(completion), adapter.images(image)):
        with pytest.raises(UpstreamError) as refused:
            asyncio.run(call)
        assert refused.value.status == 400 and refused.value.code == "model_not_supported"
