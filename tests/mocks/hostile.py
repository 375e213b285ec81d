"""A hostile OpenAI-compatible upstream: it hangs, drips bytes, or sends an answer or a single
stream event far larger than any real one. It notes when the gateway closes the connection."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from tests.mocks.script import read_body, wait_or_disconnect

Mode = Literal["hang", "drip", "huge_body", "huge_chunked_body", "huge_event"]

DRIP_EVERY = 0.05  # seconds between dripped bytes: far below any read timeout


@dataclass
class HostileUpstream:
    mode: Mode = "hang"
    size: int = 2 * 1024 * 1024  # of a huge answer or event
    # Streams: events sent before misbehaving (0: misbehave before the first event).
    good_events: int = 1
    requests: int = 0
    # Connections the gateway closed while this upstream was still sending or waiting.
    closed: int = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = msgspec.json.decode(await read_body(receive))
        self.requests += 1
        stream = bool(body.get("stream"))
        if self.mode == "hang":
            await self._start(send, stream)
            if stream:
                await self._good_events(send)
            await self._until_closed(receive)
        elif self.mode == "drip":
            await self._start(send, stream)
            if stream:
                await self._good_events(send)
            await self._drip(receive, send)
        elif self.mode in ("huge_body", "huge_chunked_body"):
            answer = completion("x" * self.size)
            length = self.mode == "huge_body"
            await self._start(send, False, len(answer) if length else None)
            await send({"type": "http.response.body", "body": answer, "more_body": False})
        else:
            await self._start(send, True)
            await self._good_events(send)
            event = b"data: " + chunk("x" * self.size) + b"\n\n"
            await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": DONE_EVENTS, "more_body": False})

    async def _start(self, send: Any, stream: bool, length: int | None = None) -> None:
        kind = b"text/event-stream" if stream else b"application/json"
        headers = [(b"content-type", kind)]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})

    async def _good_events(self, send: Any) -> None:
        for _ in range(self.good_events):
            event = b"data: " + chunk("hi") + b"\n\n"
            await send({"type": "http.response.body", "body": event, "more_body": True})

    async def _drip(self, receive: Any, send: Any) -> None:
        """One byte at a time, never finishing the answer (or the event) it began."""
        await send({"type": "http.response.body", "body": b'{"id": "x', "more_body": True})
        while not await wait_or_disconnect(receive, DRIP_EVERY):
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
        self.closed += 1

    async def _until_closed(self, receive: Any) -> None:
        while not await wait_or_disconnect(receive, 3600):
            pass
        self.closed += 1


def completion(content: str) -> bytes:
    return msgspec.json.encode(
        {
            "id": "chatcmpl-hostile",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": "hostile",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    )


def chunk(content: str) -> bytes:
    return msgspec.json.encode(
        {
            "id": "chatcmpl-hostile",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": "hostile",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
        }
    )


DONE_EVENTS = (
    b"data: "
    + msgspec.json.encode(
        {
            "id": "chatcmpl-hostile",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "hostile",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        }
    )
    + b"\n\ndata: [DONE]\n\n"
)
