"""An upstream is untrusted: whatever it sends back (header values, a hung or dripping
connection, a huge body or event) and however the router falls back, a real node answers with a
shaped error, closes what it opened and leaves the key's budget and parallel slots free."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from email.utils import formatdate

import httpx
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.types import MAX_RETRY_AFTER, UpstreamError, parse_retry_after
from tests.conftest import NodeDir, RunningNode, run_node
from tests.mocks.openai_mock import RATE_LIMITED, SERVER_ERROR, OpenAIMock
from tests.mocks.script import Failure
from tests.mocks.server import serve_app
from tests.test_budgets import make_key, spend_of
from tests.test_federation import cli, invite, make_peer, model_owners, usage_rows, wait_for

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
def mock() -> Iterator[tuple[OpenAIMock, str]]:
    with ExitStack() as stack:
        upstream = OpenAIMock(api_key=None)
        yield upstream, stack.enter_context(serve_app(upstream))


def deployment(name: str, url: str, model: str = "upstream-model", **extra: object) -> str:
    lines = [
        "[[models]]",
        f'name = "{name}"',
        'provider = "openai"',
        f'model = "{model}"',
        f'base_url = "{url}/v1"',
        "price_in = 1_000_000",
        "price_out = 1_000_000",
    ]
    lines += [f"{key} = {msgspec.json.encode(value).decode()}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def post(node: RunningNode, key: str, model: str = "m", **extra: object) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"}
    with httpx.Client(base_url=node.url, headers=headers, timeout=30) as client:
        return client.post(
            "/v1/chat/completions", json={"model": model, "messages": HELLO, **extra}
        )


def assert_shaped(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    return error


def served_then_books_free(node_dir: NodeDir, key: str, key_id: str) -> None:
    """Nothing stays held for the key: its one parallel slot is free (the next request is
    served, not refused with 429) and, once the node has stopped and given its unused lease
    back, nothing is reserved and only that one answer was charged."""
    with run_node(node_dir) as node:
        response = post(node, key)
    assert response.status_code == 200, response.text
    charged = int(response.headers["aihub-cost-micros"])
    assert spend_of(node_dir.path, f"key:{key_id}") == (charged, 0)


# --- Retry-After and other header values ---------------------------------------------------

BAD_RETRY_AFTER = [
    "inf",
    "-inf",
    "nan",
    "1e400",
    "-5",
    "9" * 400,
    "1" * 40,
    "0x10",
    "soon",
    "Wed, 31 Dec 9999 23:59:59 GMT",  # an HTTP-date far in the future
    "Sun, 06 Nov 1994 08:49:37 GMT",  # an HTTP-date in the past
    "Mon, 99 Foo 2024 99:99:99 GMT",
]


@pytest.mark.parametrize("value", BAD_RETRY_AFTER)
def test_untrusted_retry_after_gives_a_shaped_429_and_frees_the_books(node_dir, mock, value):
    upstream, url = mock
    node_dir.set_router('strategy = "priority"\nretries = 0')
    node_dir.add_config(deployment("m", url))
    key, key_id = make_key(node_dir.path, name="one", budget_micros=10**9, max_parallel=1)
    upstream.script.fail_next(
        Failure(RATE_LIMITED.status, RATE_LIMITED.body, {"retry-after": value}), times=3
    )
    with run_node(node_dir) as node:
        for _ in range(3):  # a leak of the one parallel slot would turn the next into a refusal
            response = post(node, key)
            assert_shaped(response, 429)
            wait = response.headers.get("retry-after")
            assert wait is None or 1 <= int(wait) <= MAX_RETRY_AFTER
        # The parallel slots were given back: the next request, good this time, is served.
        served = post(node, key)
        assert served.status_code == 200, served.text
    assert spend_of(node_dir.path, f"key:{key_id}") == (int(served.headers["aihub-cost-micros"]), 0)


def test_retry_after_http_date_is_honoured_as_a_delay():
    now = time.time()
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now) == pytest.approx(30, abs=1)
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now) == 0.0
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("86400000") == MAX_RETRY_AFTER


@given(st.text(max_size=80))
def test_retry_after_parsing_never_fails_and_stays_in_bounds(value):
    wait = parse_retry_after(value)
    assert wait is None or 0.0 <= wait <= MAX_RETRY_AFTER
    # Whoever builds an UpstreamError, its wait is bounded the same way.
    error = UpstreamError(429, "x", retry_after=float("inf"))
    assert error.retry_after is None


# --- allowlists hold through fallbacks -------------------------------------------------------

ECHO_Y = '[[models]]\nname = "y-model"\nprovider = "echo"'


def failing_x_with_fallback_to_y(directory: NodeDir, upstream: OpenAIMock, url: str) -> None:
    directory.set_config("retries = 2 ", "retries = 0 ")
    directory.set_config("[router.fallbacks]\n", '[router.fallbacks]\nx-model = ["y-model"]\n')
    directory.add_config(deployment("x-model", url) + "\n" + ECHO_Y)
    upstream.script.fail_next(SERVER_ERROR, times=1000)


def test_a_key_for_x_is_never_served_y_through_a_fallback(node_dir, mock):
    upstream, url = mock
    failing_x_with_fallback_to_y(node_dir, upstream, url)
    only_x, _ = make_key(node_dir.path, name="only-x", models=["x-model"])
    both, _ = make_key(node_dir.path, name="both", models=["x-model", "y-model"])
    with run_node(node_dir) as node:
        refused = post(node, only_x, "x-model")
        served = post(node, both, "x-model")
    assert_shaped(refused, 502)
    # The fallback itself works: a key allowed both models is served by y.
    assert served.status_code == 200 and served.json()["model"] == "y-model"


def test_an_invite_for_x_is_never_served_y_through_the_providers_fallback(tmp_path, mock):
    upstream, url = mock
    alice = make_peer(tmp_path, "alice")
    bob = make_peer(tmp_path, "bob")
    failing_x_with_fallback_to_y(alice.dir, upstream, url)
    with alice.run(), bob.run() as b:
        cli("join", invite(alice, "--models", "x-model"), "--data-dir", str(bob.path))
        assert wait_for(lambda: "x-model" in model_owners(b))
        response = post(b, b.key, "x-model")
    assert response.status_code in (502, 503), response.text
    assert_shaped(response, response.status_code)
    # Alice served her peer nothing: no answered request, and her echo y-model never ran.
    assert all(row.status != 200 for row in usage_rows(alice.path))
    assert len(upstream.script.received) >= 1
