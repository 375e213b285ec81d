"""The request pipeline holds budget reservations and parallel slots while it works: whatever
fails in it, nothing expected or not, they are released and the client gets a shaped error
(a 502 for the unexpected), never a 500 that strands the key's budget until a restart."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from adapters.echo import EchoAdapter, EchoStream
from adapters.events import Event
from adapters.types import ChatCall
from tests.conftest import NodeDir, RunningNode, run_node
from tests.mocks.openai_mock import RATE_LIMITED, OpenAIMock
from tests.mocks.script import Failure
from tests.mocks.server import serve_app
from tests.test_budgets import make_key

# One request's worst case is about 1,000 micro-units (1,000 output tokens at $1/1M, and a
# few prompt tokens): the budget holds one reservation, never two, so a reservation left
# behind refuses the next request; and the key may run one request at a time.
PRICED = "price_in = 1_000_000\nprice_out = 1_000_000"
CAP = 1_500
BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}


@pytest.fixture
def upstream() -> Iterator[OpenAIMock]:
    mock = OpenAIMock(api_key=None)
    with serve_app(mock) as url:
        mock.url = url  # type: ignore[attr-defined]
        yield mock


@pytest.fixture
def node(node_dir: NodeDir, upstream: OpenAIMock) -> Iterator[tuple[RunningNode, str, str]]:
    node_dir.set_config("price_in = 100_000\nprice_out = 200_000", PRICED)
    node_dir.add_config(
        f'[[models]]\nname = "flaky"\nprovider = "openai"\nmodel = "m"\n'
        f'base_url = "{upstream.url}/v1"\n{PRICED}'  # type: ignore[attr-defined]
    )
    key, key_id = make_key(node_dir.path, name="tight", budget_micros=CAP, max_parallel=1)
    with run_node(node_dir) as running:
        yield running, key, key_id


def post(node: RunningNode, key: str, model: str, **extra: object) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"}
    with httpx.Client(base_url=node.url, headers=headers, timeout=30) as client:
        return client.post("/v1/chat/completions", json={"model": model, **BODY, **extra})


def assert_shaped(response: httpx.Response, *statuses: int) -> None:
    assert response.status_code in statuses, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert "Traceback" not in response.text


def assert_released(node: RunningNode, key: str) -> None:
    """The next request is served: neither the budget nor the key's one slot was kept."""
    response = post(node, key, "echo")
    assert response.status_code == 200, response.text


def test_retry_after_inf_from_an_upstream_leaks_nothing(node, upstream) -> None:
    running, key, _ = node
    upstream.script.fail_next(
        # Every try the router makes (retries included) fails so, and the client sees it.
        Failure(RATE_LIMITED.status, RATE_LIMITED.body, {"retry-after": "inf"}),
        times=10,
    )
    assert_shaped(post(running, key, "flaky"), 429, 502)
    assert_released(running, key)
    assert_released(running, key)  # and again: the first success gave its own hold back


async def _broken(*_: object) -> None:
    raise ZeroDivisionError("a failure no parser covers")


class _BreaksMidStream(EchoStream):
    async def __aiter__(self) -> AsyncIterator[Event]:
        async for event in super().__aiter__():
            yield event
            raise KeyError("an upstream event nothing expected")


async def _open_breaking(self: EchoAdapter, call: ChatCall) -> EchoStream:
    stream = await EchoAdapter.__dict__["_real_open"](self, call)
    stream.__class__ = _BreaksMidStream
    return stream


def _start_fails(*_: object) -> None:
    raise ZeroDivisionError("fails before the stream's first byte, before its relay runs")


@pytest.mark.parametrize("where", ["chat", "open_stream", "mid_stream", "reserve", "start"])
def test_an_unexpected_exception_anywhere_releases_and_answers_502(
    node, monkeypatch, where: str
) -> None:
    running, key, _ = node
    stream = where in ("open_stream", "mid_stream", "start")
    if where == "mid_stream":
        monkeypatch.setattr(EchoAdapter, "_real_open", EchoAdapter.open_stream, raising=False)
        monkeypatch.setattr(EchoAdapter, "open_stream", _open_breaking)
    elif where == "start":
        monkeypatch.setattr("node.ingress.asgi._start", _start_fails)
    elif where == "reserve":
        monkeypatch.setattr("node.gateway.budgets.Budgets.reserve", _broken)
    else:
        monkeypatch.setattr(EchoAdapter, where, _broken)
    response = post(running, key, "echo", stream=stream)
    if where == "mid_stream":
        # The client has bytes already: the stream ends with an OpenAI-shaped error event.
        assert response.status_code == 200
        assert '"code":"gateway_error"' in response.text
        assert "[DONE]" not in response.text
    else:
        assert_shaped(response, 502)
        assert response.json()["error"]["code"] == "gateway_error"
    monkeypatch.undo()
    assert_released(running, key)
    assert_released(running, key)
