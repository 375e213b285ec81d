"""One socket write per turn of the event loop (node/ingress/coalesce.py): the transport
wrapper on its own, then a real `aihub serve` whose complete answers leave in one write
(the head and the body arrive together) and whose keep-alive connections and streams still
carry every byte in order. (Streams through the official SDK: tests/test_openai_sdk.py.)"""

from __future__ import annotations

import asyncio
import json
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from node.config import ServerSection
from node.ingress.coalesce import CoalescingTransport
from node.ingress.connections import guarded_protocol
from tests.conftest import NodeDir, serve_process
from tests.mocks.server import free_port


class Recorder(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "written after close"
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 1) if name == "peername" else default


async def _turn() -> None:
    await asyncio.sleep(0)


def test_writes_of_one_turn_leave_as_one_in_order() -> None:
    async def scenario() -> Recorder:
        real = Recorder()
        wrapped = CoalescingTransport(real, asyncio.get_running_loop())
        wrapped.write(b"HTTP/1.1 200 OK\r\n\r\n")
        wrapped.write(bytearray(b"{"))
        wrapped.write(memoryview(b"}"))
        wrapped.write(b"")
        assert real.writes == []  # held until the turn ends
        await _turn()
        wrapped.write(b"next")
        await _turn()
        return real

    real = asyncio.run(scenario())
    assert real.writes == [b"HTTP/1.1 200 OK\r\n\r\n{}", b"next"]


def test_close_sends_what_was_written_then_closes() -> None:
    async def scenario() -> Recorder:
        real = Recorder()
        wrapped = CoalescingTransport(real, asyncio.get_running_loop())
        wrapped.write(b"last words")
        wrapped.close()
        assert real.writes == [b"last words"] and real.closed
        wrapped.write(b"after the close")  # dropped, as a closing transport drops it
        await _turn()
        return real

    real = asyncio.run(scenario())
    assert real.writes == [b"last words"]


def test_abort_drops_what_is_held_and_the_rest_is_the_real_transport() -> None:
    async def scenario() -> Recorder:
        real = Recorder()
        wrapped = CoalescingTransport(real, asyncio.get_running_loop())
        assert wrapped.get_extra_info("peername") == ("127.0.0.1", 1)
        wrapped.write(b"never sent")
        wrapped.abort()
        assert wrapped.is_closing()
        await _turn()
        return real

    real = asyncio.run(scenario())
    assert real.aborted and real.writes == []


def test_a_complete_answer_leaves_before_its_task_goes_on() -> None:
    """The protocol flushes when the response is complete: what the app does after its last
    `send`, in the same turn of the loop (an access line, metrics), happens after the client
    has its answer, not before."""
    seen_after_send: list[list[bytes]] = []

    async def app(scope: dict, receive: object, send: object) -> None:
        length = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": length})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"{}"})  # type: ignore[operator]
        seen_after_send.append(list(real.writes))  # no await between: still the same turn

    async def scenario() -> None:
        config = Config(app, lifespan="off", log_config=None)
        protocol = guarded_protocol(ServerSection())(config, ServerState(), {})
        protocol.connection_made(real)
        protocol.data_received(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        while not seen_after_send:
            await _turn()
        protocol.connection_lost(None)

    real = Recorder()
    asyncio.run(scenario())
    [writes] = seen_after_send
    assert len(writes) == 1, writes  # head and body in one write, already on the socket
    assert writes[0].startswith(b"HTTP/1.1 200 OK") and writes[0].endswith(b"\r\n\r\n{}")


@pytest.fixture
def served(node_dir: NodeDir, tmp_path: Path) -> Iterator[int]:
    port = free_port()
    log = tmp_path / "serve.log"
    with serve_process(node_dir.path, port, log, "--workers", "1"):
        yield port
    assert "Traceback" not in log.read_text()


def _request(key: str, port: int, body: bytes) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\n"
        + f"host: 127.0.0.1:{port}\r\nauthorization: Bearer {key}\r\n".encode()
        + f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body
    )


def test_a_complete_answer_arrives_in_one_piece(served: int, node_dir: NodeDir) -> None:
    body = json.dumps({"model": "echo", "messages": [{"role": "user", "content": "hi"}]})
    with socket.create_connection(("127.0.0.1", served), timeout=30) as sock:
        for _ in range(3):  # keep-alive: each answer on the same connection
            sock.sendall(_request(node_dir.key, served, body.encode()))
            readable, _, _ = select.select([sock], [], [], 30)
            assert readable, "no answer"
            # One write puts head and body on the socket together: the first read has both.
            received = sock.recv(1 << 20)
            head, _, rest = received.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), received[:200]
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            assert len(rest) == length, (len(rest), length)
            assert json.loads(rest)["choices"][0]["message"]["content"] == "echo: hi"


def test_streams_and_errors_still_carry_every_byte(served: int, node_dir: NodeDir) -> None:
    url = f"http://127.0.0.1:{served}"
    headers = {"authorization": f"Bearer {node_dir.key}"}
    request = {"model": "echo", "messages": [{"role": "user", "content": "a b c d"}]}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        with client.stream(
            "POST", "/v1/chat/completions", json=request | {"stream": True}
        ) as response:
            assert response.status_code == 200
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        text = "".join(
            choice["delta"].get("content") or ""
            for event in events[:-1]
            for choice in json.loads(event.removeprefix("data: "))["choices"]
        )
        assert text == "echo: a b c d"
        refused = client.post("/v1/chat/completions", json={"model": "echo"})
        assert refused.status_code == 400 and "error" in refused.json()
        assert client.get("/health/ready").status_code == 200
