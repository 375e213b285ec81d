"""A fast mock OpenAI upstream for the benchmark: raw asyncio on uvloop, HTTP/1.1 keep-alive,
answers precomputed once, so that it is never the bottleneck.

`POST …/chat/completions` answers a chat completion; with `"stream":true` in the body, an SSE
stream of `--chunks` content deltas (plus role, finish and, when asked for, usage events and
`[DONE]`), one event every `--chunk-gap-ms`. `--latency-ms` delays every answer (and a
stream's first event). Anything else answers `{}`.

    python -m bench.mock --port 9000 [--latency-ms 0] [--chunks 8] [--chunk-gap-ms 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket

COMPLETION = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "mock-model",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Hello! I am a mock model answering at once for the benchmark.",
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 14, "completion_tokens": 14, "total_tokens": 28},
    "system_fingerprint": "fp_bench",
}


def _compact(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def response(status: str, content_type: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk holding one SSE event."""
    event = b"data: " + data + b"\n\n"
    return f"{len(event):x}\r\n".encode() + event + b"\r\n"


def stream_events(chunks: int, include_usage: bool) -> list[bytes]:
    """The SSE events of one streamed answer, each already framed as an HTTP chunk."""
    return [_chunk(data) for data in sse_data(chunks, include_usage)]


def sse_data(chunks: int, include_usage: bool) -> list[bytes]:
    """The `data:` payloads of one streamed answer's SSE events (bench/mock_aiohttp.py too)."""
    base = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "mock-model",
        "system_fingerprint": "fp_bench",
    }

    def event(delta: dict, finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _compact({**base, "choices": [choice]})

    events = [event({"role": "assistant", "content": ""})]
    events += [event({"content": f"word{i} "}) for i in range(chunks)]
    events.append(event({}, "stop"))
    if include_usage:
        usage = {"prompt_tokens": 14, "completion_tokens": chunks, "total_tokens": 14 + chunks}
        events.append(_compact({**base, "choices": [], "usage": usage}))
    events.append(b"[DONE]")
    return events


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
STREAM_END = b"0\r\n\r\n"


class Answers:
    def __init__(self, latency_ms: float, chunks: int, gap_ms: float) -> None:
        self.latency = latency_ms / 1000
        self.gap = gap_ms / 1000
        self.completion = response("200 OK", "application/json", _compact(COMPLETION))
        self.other = response("200 OK", "application/json", b"{}")
        self.streams = {usage: stream_events(chunks, usage) for usage in (False, True)}


class MockProtocol(asyncio.Protocol):
    def __init__(self, answers: Answers) -> None:
        self.answers = answers
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False  # a delayed answer or a stream is being sent: hold later requests

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self._serve()

    def _serve(self) -> None:
        while not self.busy and self.transport is not None:
            request = self._next_request()
            if request is None:
                return
            head, body = request
            self._answer(head, body)

    def _next_request(self) -> tuple[bytes, bytes] | None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(self.buffer[:end]).lower()
        start = end + 4
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            line_end = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : line_end if line_end >= 0 else None])
            if len(self.buffer) < start + length:
                return None
            body = bytes(self.buffer[start : start + length])
            del self.buffer[: start + length]
            return head, body
        if b"transfer-encoding: chunked" in head:
            return self._chunked(head, start)
        del self.buffer[:start]
        return head, b""

    def _chunked(self, head: bytes, start: int) -> tuple[bytes, bytes] | None:
        body = bytearray()
        at = start
        while True:
            line_end = self.buffer.find(b"\r\n", at)
            if line_end < 0:
                return None
            size = int(bytes(self.buffer[at:line_end]).split(b";")[0], 16)
            if len(self.buffer) < line_end + 2 + size + 2:
                return None
            body += self.buffer[line_end + 2 : line_end + 2 + size]
            at = line_end + 2 + size + 2
            if size == 0:
                del self.buffer[:at]
                return head, bytes(body)

    def _answer(self, head: bytes, body: bytes) -> None:
        answers, transport = self.answers, self.transport
        assert transport is not None
        if head.startswith(b"post") and b"/chat/completions" in head[: head.find(b"\r\n")]:
            if b'"stream":true' in body:
                usage = b'"include_usage":true' in body
                self._stream(list(answers.streams[usage]))
                return
            payload = answers.completion
        else:
            payload = answers.other
        if answers.latency > 0:
            self.busy = True
            asyncio.get_running_loop().call_later(answers.latency, self._send_later, payload)
        else:
            transport.write(payload)

    def _send_later(self, payload: bytes) -> None:
        self.busy = False
        if self.transport is not None:
            self.transport.write(payload)
            self._serve()

    def _stream(self, events: list[bytes]) -> None:
        self.busy = True
        loop = asyncio.get_running_loop()
        gap = self.answers.gap

        def send_next() -> None:
            if self.transport is None:
                return
            if gap <= 0:
                self.transport.write(STREAM_HEAD + b"".join(events) + STREAM_END)
                events.clear()
            else:
                self.transport.write(events.pop(0))
            if events:
                loop.call_later(gap, send_next)
                return
            if gap > 0:
                self.transport.write(STREAM_END)
            self.busy = False
            self._serve()

        def first() -> None:
            if self.transport is None:
                return
            if gap > 0:
                self.transport.write(STREAM_HEAD)
            send_next()

        if self.answers.latency > 0:
            loop.call_later(self.answers.latency, first)
        else:
            first()


async def serve(port: int, answers: Answers) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: MockProtocol(answers), "127.0.0.1", port, backlog=4096, reuse_address=True
    )
    stopped = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    print(f"mock upstream on http://127.0.0.1:{port}", flush=True)
    async with server:
        await stopped.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--chunk-gap-ms", type=float, default=2.0)
    args = parser.parse_args()
    answers = Answers(args.latency_ms, args.chunks, args.chunk_gap_ms)
    try:
        import uvloop

        uvloop.run(serve(args.port, answers))
    except ImportError:
        asyncio.run(serve(args.port, answers))


if __name__ == "__main__":
    main()
