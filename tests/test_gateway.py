"""One node, served for real, in front of the echo model and a mock OpenAI upstream."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import msgspec
import pytest

from node.config import DATABASE_FILE
from node.storage import open_store
from tests.conftest import NodeDir, RunningNode, run_node
from tests.mocks.openai_mock import OpenAIMock
from tests.mocks.server import serve_app
from tests.test_budgets import make_key

HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, OpenAIMock]]:
    mock = OpenAIMock(api_key="sk-mock")
    with serve_app(mock) as url:
        yield url, mock


@pytest.fixture
def node(node_dir: NodeDir, upstream, monkeypatch) -> Iterator[RunningNode]:
    url, _ = upstream
    monkeypatch.setenv("MOCK_KEY", "sk-mock")
    node_dir.add_config(
        f"""
[[models]]
name = "gpt-mock"
provider = "openai"
model = "mock-large"
base_url = "{url}/v1"
api_key_env = "MOCK_KEY"
price_in = 1_000_000
price_out = 2_000_000
"""
    )
    with run_node(node_dir) as running:
        yield running


def usage_rows(node: RunningNode):
    async def read():
        store = await open_store(node.dir.path / DATABASE_FILE)
        try:
            return await store.usage.usage_since(0)
        finally:
            await store.close()

    return asyncio.run(read())


def test_echo_chat_with_headers_and_cost(node):
    with node.client() as client:
        response = client.post("/v1/chat/completions", json={"model": "echo", "messages": HELLO})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "echo: hello there"}
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert response.headers["aihub-request-id"].startswith("req_")
    # 7 tokens at 0.1/1M in, 3 at 0.2/1M out: 1.3 micro-units, rounded up.
    assert response.headers["aihub-cost-micros"] == "2"


def test_upstream_chat_is_costed_and_recorded_once(node, upstream):
    with node.client() as client:
        response = client.post(
            "/v1/chat/completions", json={"model": "gpt-mock", "messages": HELLO}
        )
    assert response.status_code == 200
    usage = response.json()["usage"]
    expected = -(
        -(usage["prompt_tokens"] * 1_000_000 + usage["completion_tokens"] * 2_000_000) // 1_000_000
    )
    assert response.headers["aihub-cost-micros"] == str(expected)
    _, mock = upstream
    assert msgspec.json.decode(mock.script.received[-1].body)["model"] == "mock-large"
    request_id = response.headers["aihub-request-id"]
    # The usage writer batches; stopping the node flushes it.
    rows = []
    for _ in range(50):
        rows = [r for r in usage_rows(node) if r.request_id == request_id]
        if rows:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert len(rows) == 1
    row = rows[0]
    assert (row.model, row.provider, row.status, row.cost_micros) == (
        "gpt-mock",
        "openai",
        200,
        expected,
    )
    assert (row.tokens_in, row.tokens_out) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert not row.estimated and not row.stream


def test_stream_ends_with_done_and_usage_when_asked(node):
    body = {
        "model": "gpt-mock",
        "messages": HELLO,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with node.client() as client, client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [msgspec.json.decode(e[6:]) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == "mock says: hello there"


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "invalid_api_key"),
        ({"authorization": "Bearer sk-hub-000000000000_" + "a" * 43}, 401, "invalid_api_key"),
        ({"authorization": "Basic abc"}, 401, "invalid_api_key"),
    ],
)
def test_bad_keys_are_refused(node, headers, status, code):
    import httpx

    response = httpx.post(
        node.url + "/v1/chat/completions",
        json={"model": "echo", "messages": HELLO},
        headers=headers,
    )
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"", 400, None),
        (b"{not json", 400, None),
        (b"[]", 400, None),
        (b'{"model": "echo"}', 400, None),
        (b'{"model": "echo", "messages": []}', 400, "messages"),
        (b'{"model": "echo", "messages": [{"role": "robot"}]}', 400, "messages[0].role"),
        (
            b'{"model": "echo", "messages": [{"role": "user"}], "temperature": 9}',
            400,
            "temperature",
        ),
        (b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', 404, "model"),
        (b'{"model": "echo-embed", "messages": [{"role": "user", "content": "x"}]}', 400, "model"),
    ],
)
def test_invalid_requests_get_openai_errors(node, body, status, param):
    with node.client() as client:
        response = client.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param


def test_oversized_body_is_413(node_dir):
    node_dir.set_config("max_body_bytes = 4_194_304", "max_body_bytes = 2048")
    with run_node(node_dir) as node, node.client() as client:
        big = [{"role": "user", "content": "x" * 4096}]
        response = client.post("/v1/chat/completions", json={"model": "echo", "messages": big})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_models_list_and_get(node):
    with node.client() as client:
        listed = client.get("/v1/models").json()
        one = client.get("/v1/models/gpt-mock")
        missing = client.get("/v1/models/absent")
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == ["echo", "echo-embed", "gpt-mock"]
    assert all(m["owned_by"] == "alice" and m["object"] == "model" for m in listed["data"])
    assert one.status_code == 200 and one.json()["id"] == "gpt-mock"
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_models_list_shows_only_what_the_key_may_use(node, node_dir):
    """A key allowed only some models (as a peer's key is, by its invite) sees those alone,
    and asking for another by id is a 404, as for a model that does not exist."""
    key, _ = make_key(node_dir.path, name="narrow", models=["echo*"])
    with httpx.Client(base_url=node.url, headers={"authorization": f"Bearer {key}"}) as client:
        listed = client.get("/v1/models").json()
        hidden = client.get("/v1/models/gpt-mock")
    assert [m["id"] for m in listed["data"]] == ["echo", "echo-embed"]
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "model_not_found"


def test_embeddings_echo_float_and_base64(node):
    with node.client() as client:
        floats = client.post(
            "/v1/embeddings", json={"model": "echo-embed", "input": ["a", "b"], "dimensions": 8}
        ).json()
        b64 = client.post(
            "/v1/embeddings",
            json={"model": "echo-embed", "input": "a", "encoding_format": "base64"},
        ).json()
        wrong = client.post("/v1/embeddings", json={"model": "echo", "input": "a"})
        mixed = client.post("/v1/embeddings", json={"model": "echo-embed", "input": ["a", 1]})
    assert [len(d["embedding"]) for d in floats["data"]] == [8, 8]
    assert floats["data"][0]["embedding"] != floats["data"][1]["embedding"]
    assert isinstance(b64["data"][0]["embedding"], str)
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "model_not_supported"
    assert mixed.status_code == 400


def test_health_and_metrics(node):
    import httpx

    live = httpx.get(node.url + "/health/live").json()
    assert live["status"] == "ok" and live["node"] == "alice"
    ready = httpx.get(node.url + "/health/ready")
    assert ready.status_code == 200 and ready.json()["node"] == "alice"
    with node.client() as client:
        client.post("/v1/chat/completions", json={"model": "echo", "messages": HELLO})
    metrics = httpx.get(node.url + "/metrics").text
    assert 'aihub_requests_total{endpoint="chat",model="echo",status="200"}' in metrics
    assert 'aihub_tokens_total{direction="out",model="echo"}' in metrics
    assert "aihub_request_duration_seconds_bucket" in metrics
    schema = httpx.get(node.url + "/schema/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"]
