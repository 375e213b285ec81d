"""Routing through a real node to real mock upstreams: retries, fallbacks, cooldown,
strategies, streams that fail before and after their first byte, and cancellation."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import msgspec
import pytest

from node.config import DATABASE_FILE
from node.ingress import asgi
from tests.conftest import NodeDir, RunningNode, run_node
from tests.hangup import post_then_hang_up
from tests.mocks.openai_mock import RATE_LIMITED, SERVER_ERROR, OpenAIMock, openai_error
from tests.mocks.script import Failure
from tests.mocks.server import serve_app

HELLO = [{"role": "user", "content": "hello"}]


class Upstreams:
    """Named mock upstreams, each on its own port."""

    def __init__(self, stack: ExitStack, names: list[str]) -> None:
        self.mocks: dict[str, OpenAIMock] = {}
        self.urls: dict[str, str] = {}
        for name in names:
            mock = OpenAIMock(api_key=None)
            self.mocks[name] = mock
            self.urls[name] = stack.enter_context(serve_app(mock))

    def count(self, name: str) -> int:
        return len(self.mocks[name].script.received)

    def deployment(self, name: str, model: str, **extra: object) -> str:
        lines = [
            "[[models]]",
            f'name = "{model}"',
            'provider = "openai"',
            f'model = "{name}"',
            f'base_url = "{self.urls[name]}/v1"',
        ]
        lines += [f"{key} = {msgspec.json.encode(value).decode()}" for key, value in extra.items()]
        return "\n".join(lines) + "\n"


@pytest.fixture
def upstreams() -> Iterator[Upstreams]:
    with ExitStack() as stack:
        yield Upstreams(stack, ["p", "s", "t"])


def configure(node_dir: NodeDir, router: str, deployments: list[str]) -> None:
    node_dir.set_router(router)
    node_dir.add_config("\n".join(deployments))


def chat(node: RunningNode, model: str = "m", **extra: object) -> httpx.Response:
    with node.client() as client:
        return client.post(
            "/v1/chat/completions", json={"model": model, "messages": HELLO, **extra}
        )


FAST = 'strategy = "priority"\nbackoff_base = 0.01\nbackoff_max = 0.05'


def served_by(response: httpx.Response) -> str:
    return response.json()["model"]


def test_retry_honours_retry_after(node_dir, upstreams):
    configure(node_dir, FAST, [upstreams.deployment("p", "m"), upstreams.deployment("s", "m")])
    upstreams.mocks["p"].script.fail_next(
        Failure(RATE_LIMITED.status, RATE_LIMITED.body, {"retry-after": "1"})
    )
    with run_node(node_dir) as node:
        started = time.monotonic()
        response = chat(node)
        elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert served_by(response) == "p"  # retried on the same deployment, after waiting
    assert upstreams.count("p") == 2 and upstreams.count("s") == 0
    assert elapsed >= 0.95


def test_long_retry_after_moves_on_at_once(node_dir, upstreams):
    router = FAST + "\nmax_retry_wait = 2.0"
    configure(node_dir, router, [upstreams.deployment("p", "m"), upstreams.deployment("s", "m")])
    upstreams.mocks["p"].script.fail_next(
        Failure(RATE_LIMITED.status, RATE_LIMITED.body, {"retry-after": "60"})
    )
    with run_node(node_dir) as node:
        response = chat(node)
        # The 60 s Retry-After also rests p: the next request goes straight to s.
        second = chat(node)
    assert response.status_code == 200 and served_by(response) == "s"
    assert served_by(second) == "s"
    assert upstreams.count("p") == 1


def test_server_errors_fall_back_to_next_deployment_then_next_model(node_dir, upstreams):
    router = FAST + '\nretries = 1\n\n[router.fallbacks]\nm = ["backup"]'
    configure(
        node_dir,
        router,
        [
            upstreams.deployment("p", "m"),
            upstreams.deployment("s", "m"),
            upstreams.deployment("t", "backup"),
        ],
    )
    upstreams.mocks["p"].script.fail_next(SERVER_ERROR, times=2)
    upstreams.mocks["s"].script.fail_next(SERVER_ERROR, times=2)
    with run_node(node_dir) as node:
        response = chat(node)
    assert response.status_code == 200
    assert served_by(response) == "t"
    assert (upstreams.count("p"), upstreams.count("s"), upstreams.count("t")) == (2, 2, 1)


def test_all_failing_gives_the_last_error_openai_shaped(node_dir, upstreams):
    configure(node_dir, FAST + "\nretries = 0", [upstreams.deployment("p", "m")])
    upstreams.mocks["p"].script.fail_next(
        Failure(RATE_LIMITED.status, RATE_LIMITED.body, {"retry-after": "7"})
    )
    with run_node(node_dir) as node:
        response = chat(node)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    error = response.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and "Rate limit reached" in error["message"]


def test_client_errors_do_not_fall_back(node_dir, upstreams):
    configure(node_dir, FAST, [upstreams.deployment("p", "m"), upstreams.deployment("s", "m")])
    bad = openai_error(
        400,
        "This model's maximum context length is 8 tokens",
        "invalid_request_error",
        "context_length_exceeded",
    )
    upstreams.mocks["p"].script.fail_next(bad)
    with run_node(node_dir) as node:
        response = chat(node)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert upstreams.count("s") == 0


def test_failing_deployment_cools_down(node_dir, upstreams):
    router = FAST + "\nretries = 0\ncooldown_failures = 2\ncooldown_seconds = 60"
    configure(node_dir, router, [upstreams.deployment("p", "m"), upstreams.deployment("s", "m")])
    upstreams.mocks["p"].script.fail_next(SERVER_ERROR, times=2)
    with run_node(node_dir) as node:
        assert [served_by(chat(node)) for _ in range(4)] == ["s"] * 4
    # Two failures put p to rest; the next two requests did not try it.
    assert upstreams.count("p") == 2


def test_weighted_round_robin_spreads_by_weight(node_dir, upstreams):
    configure(
        node_dir,
        'strategy = "weighted"',
        [upstreams.deployment("p", "m", weight=3), upstreams.deployment("s", "m", weight=1)],
    )
    with run_node(node_dir) as node:
        served = [served_by(chat(node)) for _ in range(8)]
    assert served.count("p") == 6 and served.count("s") == 2


def test_lowest_cost_prefers_the_cheaper_deployment(node_dir, upstreams):
    configure(
        node_dir,
        'strategy = "lowest-cost"',
        [
            upstreams.deployment("p", "m", price_in=5_000_000, price_out=5_000_000),
            upstreams.deployment("s", "m", price_in=1_000_000, price_out=1_000_000),
        ],
    )
    with run_node(node_dir) as node:
        response = chat(node)
    assert served_by(response) == "s"
    # The cost charged is the deployment's own price.
    usage = response.json()["usage"]
    expected = -(-(usage["prompt_tokens"] + usage["completion_tokens"]) * 1_000_000 // 1_000_000)
    assert response.headers["aihub-cost-micros"] == str(expected)


def test_priority_field_orders_deployments(node_dir, upstreams):
    configure(
        node_dir,
        'strategy = "priority"',
        [upstreams.deployment("p", "m", priority=5), upstreams.deployment("s", "m", priority=1)],
    )
    with run_node(node_dir) as node:
        assert served_by(chat(node)) == "s"


def stream_events(node: RunningNode, model: str = "m") -> list[str]:
    body = {"model": model, "messages": HELLO, "stream": True}
    with node.client() as client, client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def test_stream_falls_back_before_first_byte(node_dir, upstreams):
    configure(
        node_dir,
        FAST + "\nretries = 0",
        [upstreams.deployment("p", "m"), upstreams.deployment("s", "m")],
    )
    upstreams.mocks["p"].script.fail_next(SERVER_ERROR)
    with run_node(node_dir) as node:
        events = stream_events(node)
    assert events[-1] == "[DONE]"
    assert {msgspec.json.decode(e)["model"] for e in events[:-1]} == {"s"}


def test_stream_failing_after_first_byte_ends_with_an_error_event(node_dir, upstreams):
    configure(node_dir, FAST, [upstreams.deployment("p", "m"), upstreams.deployment("s", "m")])
    upstreams.mocks["p"].script.cut_stream_after = 2
    with run_node(node_dir) as node:
        events = stream_events(node)
    assert "[DONE]" not in events
    last = msgspec.json.decode(events[-1])
    assert "ended early" in last["error"]["message"]
    # No silent switch to another deployment mid-answer.
    assert upstreams.count("s") == 0
    assert {msgspec.json.decode(e)["model"] for e in events[:-1]} == {"p"}


def wait_for(predicate, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# How the node learns that a client went: from `aihub serve`'s connection protocol
# (`node/ingress/client_gone.py`), or from a watcher task on `receive()` under any other
# server. Each run refuses the other way, so that neither passes on the other's work.
SERVERS = {"aihub's protocol": None, "plain uvicorn": "httptools"}


@pytest.fixture(params=list(SERVERS))
def server(request, monkeypatch):
    http = SERVERS[request.param]
    watchers: list[object] = []
    real = asgi._watcher_task

    def counted(watch):
        watchers.append(watch)
        if http is None:
            raise AssertionError("a watcher task under aihub's own protocol")
        return real(watch)

    monkeypatch.setattr(asgi, "_watcher_task", counted)
    yield http
    assert bool(watchers) == (http is not None)


def test_client_disconnect_cancels_the_upstream_call(node_dir, upstreams, server):
    configure(node_dir, FAST, [upstreams.deployment("p", "m")])
    script = upstreams.mocks["p"].script
    script.delay = 5.0
    with run_node(node_dir, http=server) as node:
        body = msgspec.json.encode({"model": "m", "messages": HELLO})
        headers = {"authorization": f"Bearer {node.key}", "content-type": "application/json"}
        url = node.url + "/v1/chat/completions"
        post_then_hang_up(url, headers, body, lambda: len(script.received) == 1)
        assert wait_for(lambda: script.cancelled == 1, 3.0)
        # Settled as closed by the client, charged nothing.
        assert wait_for(lambda: usage_statuses(node_dir) == [(499, 0, 0)], 3.0)


def test_client_disconnect_mid_stream_cancels_the_upstream_stream(node_dir, upstreams, server):
    configure(node_dir, FAST, [upstreams.deployment("p", "m")])
    script = upstreams.mocks["p"].script
    script.chunk_delay = 0.2
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "a b c d e f g h i j k"}],
        "stream": True,
    }
    with run_node(node_dir, http=server) as node:
        with (
            node.client() as client,
            client.stream("POST", "/v1/chat/completions", json=body) as response,
        ):
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
        assert wait_for(lambda: script.cancelled == 1, 3.0)
        # Settled as closed by the client, with what was delivered estimated and charged.
        assert wait_for(lambda: len(usage_statuses(node_dir)) == 1, 3.0)
        ((status, tokens_out, estimated),) = usage_statuses(node_dir)
        assert (status, estimated) == (499, 1) and tokens_out >= 1


def usage_statuses(node_dir: NodeDir) -> list[tuple[int, int, int]]:
    with sqlite3.connect(node_dir.path / DATABASE_FILE) as db:
        query = "SELECT status, tokens_out, estimated FROM usage ORDER BY ts_ms"
        return [tuple(row) for row in db.execute(query)]
