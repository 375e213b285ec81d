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

from adapters.http import iter_ndjson, iter_sse
from adapters.types import MAX_RETRY_AFTER, Upstream, UpstreamError, parse_retry_after
from tests.conftest import NodeDir, RunningNode, run_node
from tests.mocks.hostile import HostileUpstream
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


# --- Redirects ------------------------------------------------------------------------------


def redirecting_to(target: str, status: int) -> object:
    """An upstream that answers every request with a redirect to `target`'s same path."""

    async def app(scope: dict, receive: object, send: object) -> None:
        location = (target + scope["path"]).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"location", location), (b"content-length", b"0")],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    return app


@pytest.mark.parametrize("status", [307, 308, 302])
def test_a_redirect_is_not_followed_to_another_host(node_dir, status):
    """An upstream that redirects elsewhere gets no second request sent there: on a 307 or
    308 aiohttp would resend the prompt, and every header but `Authorization` (an Azure
    `api-key`, an Anthropic `x-api-key`, a deployment's own headers) to whatever host the
    upstream names. The client gets a shaped 502 and nothing is charged."""
    with ExitStack() as stack:
        elsewhere = OpenAIMock(api_key=None)
        target = stack.enter_context(serve_app(elsewhere))
        url = stack.enter_context(serve_app(redirecting_to(target, status)))
        node_dir.set_config("retries = 2 ", "retries = 0 ")
        node_dir.add_config(deployment("m", url) + 'headers = { x-secret = "sk-deployment" }\n')
        key, key_id = make_key(node_dir.path, name="one", budget_micros=10**9)
        with run_node(node_dir) as node:
            error = assert_shaped(post(node, key), 502)
        assert elsewhere.script.received == []
    assert f"answered {status}" in str(error["message"])
    assert spend_of(node_dir.path, f"key:{key_id}") == (0, 0)


def test_a_deployment_key_with_a_line_break_is_a_shaped_502_and_nothing_is_sent(
    node_dir, mock, monkeypatch
):
    """An API key read with its trailing newline (`KEY=$(cat file)` keeps none, a file read
    whole does) would split the request to the provider: it is never sent, the client gets a
    shaped 502 that says why, and nothing is charged or held."""
    upstream, url = mock
    monkeypatch.setenv("AIHUB_TEST_BROKEN_KEY", "sk-broken\r\nx-smuggled: 1")
    node_dir.set_config("retries = 2 ", "retries = 0 ")
    node_dir.add_config(deployment("m", url, api_key_env="AIHUB_TEST_BROKEN_KEY"))
    key, key_id = make_key(node_dir.path, name="one", budget_micros=10**9)
    with run_node(node_dir) as node:
        error = assert_shaped(post(node, key), 502)
    assert upstream.script.received == []
    assert "control character" in str(error["message"])
    assert spend_of(node_dir.path, f"key:{key_id}") == (0, 0)


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


# --- deadlines and size limits ---------------------------------------------------------------

LIMITS = 64 * 1024


def hostile_node(node_dir: NodeDir, url: str, *, attempt: float, request: float) -> None:
    node_dir.set_config("retries = 2 ", "retries = 1 ")
    node_dir.set_config("backoff_base = 0.25 ", "backoff_base = 0.01 ")
    node_dir.set_config("attempt_timeout = 600.0 ", f"attempt_timeout = {attempt} ")
    node_dir.set_config("request_timeout = 900.0 ", f"request_timeout = {request} ")
    node_dir.set_config("max_response_bytes = 67_108_864 ", f"max_response_bytes = {LIMITS} ")
    node_dir.set_config("max_event_bytes = 1_048_576 ", f"max_event_bytes = {LIMITS} ")
    node_dir.add_config(deployment("m", url))


@pytest.fixture
def hostile() -> Iterator[tuple[HostileUpstream, str]]:
    upstream = HostileUpstream()
    with serve_app(upstream) as url:
        yield upstream, url


def closed_by_the_gateway(upstream: HostileUpstream, count: int) -> bool:
    return wait_for(lambda: upstream.closed >= count)


def stream_events(node: RunningNode, key: str) -> list[bytes]:
    headers = {"authorization": f"Bearer {key}"}
    body = {"model": "m", "messages": HELLO, "stream": True}
    with (
        httpx.Client(base_url=node.url, headers=headers, timeout=30) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        return [line for line in response.iter_lines() if line.startswith("data: ")]


def stream_error(events: list[str]) -> dict[str, object]:
    errors = [msgspec.json.decode(e[6:]) for e in events if e.startswith('data: {"error"')]
    assert len(errors) == 1, events
    return errors[0]["error"]


@pytest.mark.parametrize("mode", ["hang", "drip"])
def test_an_upstream_that_hangs_or_drips_gets_a_504_within_the_attempt_deadline(
    node_dir, hostile, mode
):
    upstream, url = hostile
    upstream.mode = mode
    hostile_node(node_dir, url, attempt=0.5, request=30)
    key, key_id = make_key(node_dir.path, name="one", budget_micros=10**9, max_parallel=1)
    with run_node(node_dir) as node:
        error = assert_shaped(post(node, key), 504)
        assert error["type"] == "timeout" and error["code"] == "deadline_exceeded"
        assert upstream.requests == 2  # the deployment was retried once, then given up
        assert closed_by_the_gateway(upstream, 2)
        upstream.mode = "huge_body"
        upstream.size = 10
        served = post(node, key)  # the parallel slot came back
        assert served.status_code == 200, served.text
    assert spend_of(node_dir.path, f"key:{key_id}") == (int(served.headers["aihub-cost-micros"]), 0)


@pytest.mark.parametrize("mode", ["hang", "drip"])
def test_a_stream_that_hangs_or_drips_after_its_first_event_ends_with_a_timeout_event(
    node_dir, hostile, mode
):
    upstream, url = hostile
    upstream.mode = mode
    hostile_node(node_dir, url, attempt=0.5, request=30)
    with run_node(node_dir) as node:
        events = stream_events(node, node.key)
        assert closed_by_the_gateway(upstream, 1)
    assert events[0].startswith('data: {"id"')  # the good first event reached the client
    error = stream_error(events)
    assert error["type"] == "timeout"


def test_the_request_deadline_bounds_retries_and_fallbacks(node_dir, hostile):
    upstream, url = hostile
    # Each attempt could take 20 s; the request as a whole may take 0.5 s.
    hostile_node(node_dir, url, attempt=20, request=0.5)
    node_dir.add_config(deployment("m", url))  # a second deployment to fall back to
    with run_node(node_dir) as node:
        error = assert_shaped(post(node, node.key), 504)
        assert closed_by_the_gateway(upstream, 1)
    assert error["code"] == "deadline_exceeded"
    assert upstream.requests == 1  # nothing more was tried once the deadline had passed


@pytest.mark.parametrize("mode", ["huge_body", "huge_chunked_body"])
def test_an_answer_past_the_size_limit_is_a_502(node_dir, hostile, mode):
    upstream, url = hostile
    upstream.mode = mode
    hostile_node(node_dir, url, attempt=30, request=30)
    key, key_id = make_key(node_dir.path, name="one", budget_micros=10**9, max_parallel=1)
    with run_node(node_dir) as node:
        error = assert_shaped(post(node, key), 502)
        assert error["code"] == "upstream_response_too_large"
        upstream.size = 10
        served = post(node, key)
        assert served.status_code == 200, served.text
    assert spend_of(node_dir.path, f"key:{key_id}") == (int(served.headers["aihub-cost-micros"]), 0)


def test_a_single_stream_event_past_the_limit_is_a_502(node_dir, hostile):
    upstream, url = hostile
    upstream.mode = "huge_event"
    upstream.good_events = 0  # the huge event comes first: a plain 502, not a stream
    hostile_node(node_dir, url, attempt=30, request=30)
    with run_node(node_dir) as node:
        headers = {"authorization": f"Bearer {node.key}"}
        body = {"model": "m", "messages": HELLO, "stream": True}
        first = httpx.post(node.url + "/v1/chat/completions", json=body, headers=headers)
        upstream.good_events = 1  # after a good event: the stream ends with an error event
        events = stream_events(node, node.key)
    error = assert_shaped(first, 502)
    assert error["code"] == "upstream_response_too_large"
    assert stream_error(events)["code"] == "upstream_response_too_large"


class _Dripped:
    """An upstream body arriving in small chunks, as a slow or hostile provider sends it."""

    def __init__(self, body: bytes, chunk: int = 1000) -> None:
        self._pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)]

    async def aiter_bytes(self):  # type: ignore[no-untyped-def]
        for piece in self._pieces:
            yield piece


SMALL = Upstream(provider="ollama", model="m", max_event_bytes=LIMITS)


async def _drain(events) -> int:  # type: ignore[no-untyped-def]
    count = 0
    async for _ in events:
        count += 1
    return count


@pytest.mark.parametrize(
    "body",
    [
        b"data: " + b"x" * (2 * LIMITS) + b"\n\n",  # one line, never ending in time
        b"".join(b"data: " + b"x" * 1000 + b"\n" for _ in range(200)) + b"\n",  # many lines
        b": " + b"x" * (2 * LIMITS) + b"\n",  # a comment is an event's line too
    ],
)
async def test_sse_events_past_the_limit_are_refused_however_they_arrive(body):
    with pytest.raises(UpstreamError) as caught:
        await _drain(iter_sse(_Dripped(body), SMALL))  # type: ignore[arg-type]
    assert caught.value.status == 502 and caught.value.code == "upstream_response_too_large"


async def test_ndjson_lines_past_the_limit_are_refused_and_small_ones_pass():
    huge = b'{"message": "' + b"x" * (2 * LIMITS) + b'"}\n'
    with pytest.raises(UpstreamError):
        await _drain(iter_ndjson(_Dripped(huge), SMALL))  # type: ignore[arg-type]
    with pytest.raises(UpstreamError):
        await _drain(iter_ndjson(_Dripped(huge, chunk=len(huge)), SMALL))  # type: ignore[arg-type]
    fine = b'{"done": false}\n' * 5000  # far more than the limit in all, each line small
    assert await _drain(iter_ndjson(_Dripped(fine), SMALL)) == 5000  # type: ignore[arg-type]
    many = b"data: {}\n\n" * 20000
    assert await _drain(iter_sse(_Dripped(many, chunk=LIMITS * 3), SMALL)) == 20000  # type: ignore[arg-type]
