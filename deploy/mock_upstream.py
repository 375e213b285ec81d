"""A tiny OpenAI-format upstream for demos and compose.peers.yml: no model, no key needed.

    python deploy/mock_upstream.py --host 0.0.0.0 --port 9000
    uvicorn --app-dir deploy mock_upstream:app --port 9000

Speaks enough of OpenAI's wire format for any OpenAI-compatible client (and an aihub node's
`openai` provider): `POST /v1/chat/completions` (plain, and streamed as SSE with
`stream_options.include_usage`), `POST /v1/embeddings` (float or base64), `GET /v1/models`, and
OpenAI-shaped errors. A chat answer is `mock: <the last user message>`; token counts are words.
`GET /health` answers 200 for health checks. If MOCK_API_KEY is set, requests must carry it as
a Bearer token. Standard library only, plus uvicorn to serve it.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

MODELS = ("mock-gpt", "mock-embed")
EMBEDDING_DIMS = 8
MAX_BODY = 4 * 1024 * 1024


def error(status: int, message: str, type_: str, code: str | None = None) -> tuple[int, bytes]:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return status, json.dumps(body).encode()


def text_of(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part.get("text", "")) for part in content if isinstance(part, dict)
        ).strip()
    return ""


def tokens(text: str) -> int:
    return max(1, len(text.split()))


def chat_answer(body: dict[str, Any]) -> tuple[str, int, int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty array")
    prompt = " ".join(text_of(m.get("content")) for m in messages if isinstance(m, dict))
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    last = text_of(users[-1].get("content")) if users else ""
    words = f"mock: {last}".split()
    limit = body.get("max_tokens") or body.get("max_completion_tokens")
    if isinstance(limit, int) and limit > 0:
        words = words[:limit]
    reply = " ".join(words)
    return reply, tokens(prompt), len(words)


def completion(body: dict[str, Any]) -> dict[str, Any]:
    reply, prompt_tokens, completion_tokens = chat_answer(body)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", MODELS[0]),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def stream_events(body: dict[str, Any]) -> list[bytes]:
    reply, prompt_tokens, completion_tokens = chat_answer(body)
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body.get("model", MODELS[0]),
    }

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        event = {**base, "choices": [choice], **extra}
        return b"data: " + json.dumps(event).encode() + b"\n\n"

    events = [chunk({"role": "assistant", "content": ""})]
    for index, word in enumerate(reply.split()):
        events.append(chunk({"content": word if index == 0 else " " + word}))
    events.append(chunk({}, "stop"))
    options = body.get("stream_options") or {}
    if isinstance(options, dict) and options.get("include_usage"):
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        events.append(
            b"data: " + json.dumps({**base, "choices": [], "usage": usage}).encode() + b"\n\n"
        )
    events.append(b"data: [DONE]\n\n")
    return events


def embedding(text: str, dims: int) -> list[float]:
    """A deterministic unit-free vector in [-1, 1) from the text's hash."""
    digest = b""
    counter = 0
    while len(digest) < dims * 4:
        digest += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    values = struct.unpack(f"<{dims}I", digest[: dims * 4])
    return [round(v / 2**31 - 1.0, 6) for v in values]


def embeddings(body: dict[str, Any]) -> dict[str, Any]:
    inputs = body.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise ValueError("'input' must be a string or a non-empty array")
    dims = body.get("dimensions") or EMBEDDING_DIMS
    if not isinstance(dims, int) or not 1 <= dims <= 4096:
        raise ValueError("'dimensions' must be an integer from 1 to 4096")
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, item in enumerate(inputs):
        vector = embedding(str(item), dims)
        value: Any = vector
        if as_base64:
            value = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": value})
    used = sum(tokens(str(item)) for item in inputs)
    return {
        "object": "list",
        "data": data,
        "model": body.get("model", MODELS[1]),
        "usage": {"prompt_tokens": used, "total_tokens": used},
    }


async def read_body(receive: Receive) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def respond(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def authorised(scope: Scope) -> bool:
    expected = os.environ.get("MOCK_API_KEY")
    if not expected:
        return True
    headers = dict(scope.get("headers") or [])
    given = headers.get(b"authorization", b"").decode(errors="replace")
    return given == f"Bearer {expected}"


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    method, path = scope["method"], scope["path"].rstrip("/")
    json_type = b"application/json"
    if path == "/health":
        await respond(send, 200, b'{"status":"ok"}', json_type)
        return
    if not authorised(scope):
        await respond(
            send, *error(401, "Incorrect API key provided.", "invalid_request_error"), json_type
        )
        return
    if method == "GET" and path == "/v1/models":
        models = [
            {"id": name, "object": "model", "created": 0, "owned_by": "mock"} for name in MODELS
        ]
        await respond(send, 200, json.dumps({"object": "list", "data": models}).encode(), json_type)
        return
    if method != "POST" or path not in ("/v1/chat/completions", "/v1/embeddings"):
        await respond(send, *error(404, f"Unknown URL: {method} {path}", "not_found"), json_type)
        return
    raw = await read_body(receive)
    try:
        body = json.loads(raw or b"")
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        if path == "/v1/embeddings":
            await respond(send, 200, json.dumps(embeddings(body)).encode(), json_type)
            return
        if not body.get("stream"):
            await respond(send, 200, json.dumps(completion(body)).encode(), json_type)
            return
        events = stream_events(body)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        await respond(send, *error(400, str(exc), "invalid_request_error"), json_type)
        return
    headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for event in events:
        await send({"type": "http.response.body", "body": event, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
