"""A stream's upstream connection goes back to the pool once the stream is complete, so that
the next request does not pay a new connection (a TLS handshake, with a real provider) before
its first byte; an upstream that keeps its body open after its last event loses it instead,
and holds neither the client's stream nor the request."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from adapters.http import UpstreamClient
from adapters.openai import OpenAIAdapter
from adapters.types import Upstream
from tests.calls import chat_call
from tests.conftest import NodeDir, RunningNode, run_node
from tests.mocks.hostile import DONE_EVENTS, chunk
from tests.mocks.script import read_body, wait_or_disconnect
from tests.mocks.server import serve_app
from tests.test_federation import wait_for
from tests.test_upstream_untrusted import HELLO, deployment


class StreamingUpstream:
    """An OpenAI-compatible stream whose last event (`[DONE]`) and the end of its chunked body
    are sent apart, as aiohttp's and uvicorn's servers do (a write, then the end); with
    `gated`, the end only once the test says so (`release`); with `hang`, never. Notes each
    connection (the client's address and port)."""

    def __init__(self, *, hang: bool = False, gated: bool = False) -> None:
        self.hang = hang
        self.gated = gated
        self.connections: set[tuple[str, int]] = set()
        self.closed = 0
        self._gate: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    def release(self) -> None:
        """End the body whose end is held (the server runs in a thread of its own)."""
        assert self._gate is not None
        loop, gate = self._gate
        loop.call_soon_threadsafe(gate.set)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await read_body(receive)
        self.connections.add(tuple(scope["client"]))
        if self.gated:
            self._gate = (asyncio.get_running_loop(), asyncio.Event())
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for word in ("hello", " there"):
            event = b"data: " + chunk(word) + b"\n\n"
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": DONE_EVENTS, "more_body": True})
        if self._gate is not None:
            await self._gate[1].wait()
        if not self.hang:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        while not await wait_or_disconnect(receive, 3600):
            pass
        self.closed += 1


def serve(node_dir: NodeDir, upstream: StreamingUpstream) -> Iterator[RunningNode]:
    with serve_app(upstream) as url:
        node_dir.add_config(deployment("m", url))
        with run_node(node_dir) as node:
            yield node


def streamed(client: httpx.Client) -> list[str]:
    body = {"model": "m", "messages": HELLO, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        return [line for line in response.iter_lines() if line.startswith("data: ")]


@pytest.fixture
def client(node_dir: NodeDir) -> Iterator[httpx.Client]:
    headers = {"authorization": f"Bearer {node_dir.key}"}
    with httpx.Client(headers=headers, timeout=10) as made:
        yield made


def test_a_complete_streams_connection_is_kept_for_the_next_request(node_dir, client):
    upstream = StreamingUpstream()
    for node in serve(node_dir, upstream):
        client.base_url = node.url
        for _ in range(20):
            events = streamed(client)
            assert events[-1] == "data: [DONE]"
            assert '"hello"' in events[0]
    # Each stream read to its end: one connection served all twenty.
    assert len(upstream.connections) == 1


def test_an_upstream_that_keeps_its_body_open_after_the_end_loses_its_connection(node_dir, client):
    upstream = StreamingUpstream(hang=True)
    for node in serve(node_dir, upstream):
        client.base_url = node.url
        for count in (1, 2):
            # The client's stream ends all the same, complete (the read timeout is 600 s).
            events = streamed(client)
            assert events[-1] == "data: [DONE]"
            assert wait_for(lambda count=count: upstream.closed >= count)
        assert len(upstream.connections) == 2


async def test_the_adapter_reads_a_complete_streams_end_before_it_lets_the_connection_go():
    """Deterministic: the stream is read to its last event while the body's end is held, and
    only then sent; closing the stream waits for it, so the next stream reuses the connection
    (closing it at once, as before, made a new one)."""
    upstream = StreamingUpstream(gated=True)
    with serve_app(upstream) as url:
        config = Upstream(provider="openai", model="m", base_url=url + "/v1", api_key="k")
        async with UpstreamClient() as client:
            adapter = OpenAIAdapter(config, client)
            for _ in range(2):
                stream = await adapter.open_stream(chat_call(stream=True))
                events = [event async for event in stream]
                assert len(events) == 3  # two words and the finish
                upstream.release()
                await stream.aclose()
    assert len(upstream.connections) == 1
