"""A mock Ollama server speaking its native wire format.

`/api/chat` answers `mock says: <last user message>`, one word per token, streamed as NDJSON
unless the request says `"stream": false` (Ollama streams by default); `options.num_predict`
cuts the answer with `done_reason: "length"`. Given tools, it calls the first one with
`{"city": "Paris"}`; after a tool result it answers `mock says: <the result>`. `/api/embed`
gives deterministic vectors, `/api/tags` lists the models. Unknown models get Ollama's 404.
Every request is recorded in the script, which also queues failures and delays.
A raw ASGI app so that benchmarks measure the gateway, not the mock.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec

from tests.mocks.script import Failure, MockScript, read_body, send_stream, wait_or_disconnect


class _Function(msgspec.Struct):
    name: str
    # Ollama rejects a JSON string here, so the mock does too.
    arguments: dict[str, Any]


class _ToolCall(msgspec.Struct):
    function: _Function
    id: str | None = None


class _Message(msgspec.Struct):
    role: str
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[_ToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None


class _ToolFunction(msgspec.Struct):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class _Tool(msgspec.Struct):
    function: _ToolFunction
    type: str = "function"


class _Chat(msgspec.Struct):
    model: str
    messages: list[_Message] = []
    stream: bool = True
    options: dict[str, Any] | None = None
    tools: list[_Tool] | None = None
    format: Any = None
    keep_alive: Any = None
    think: Any = None


class _Embed(msgspec.Struct):
    model: str
    input: str | list[str]
    dimensions: int | None = None
    truncate: bool | None = None
    options: dict[str, Any] | None = None
    keep_alive: Any = None


def ollama_error(status: int, message: str) -> Failure:
    return Failure(status, msgspec.json.encode({"error": message}))


SERVER_ERROR = ollama_error(500, "llama runner process has terminated: exit status 2")
OVERLOADED = ollama_error(503, "server busy, please try again.  maximum pending requests exceeded")


def _full_name(name: str) -> str:
    """Ollama's `model:tag` form: a name without a tag means `:latest`."""
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def mock_vector(text: str, index: int, dims: int) -> list[float]:
    """The vector the mock gives `text` at `index`, for tests to compare against."""
    return [((len(text) + index + d) % 7) / 7.0 for d in range(dims)]


class OllamaMock:
    def __init__(
        self,
        script: MockScript | None = None,
        models: tuple[str, ...] = ("llama3",),
        *,
        tool_call_ids: bool = False,
    ) -> None:
        self.script = script or MockScript()
        self.models = {_full_name(name) for name in models}
        # Newer Ollama versions id their tool calls; earlier ones do not.
        self.tool_call_ids = self._tool_call_ids = tool_call_ids
        # Answer without prompt_eval_count/eval_count, as Ollama before 0.2 did when the
        # prompt was cached.
        self.omit_counts = False
        self._stream_error: tuple[str, int] | None = None

    def fail_stream_next(self, message: str, after: int = 1) -> None:
        """Make the next streamed chat send `after` content lines, then `{"error": message}`."""
        self._stream_error = (message, after)

    def reset(self) -> None:
        """Forget requests, queued failures and switches, as between two tests."""
        self.script = MockScript()
        self.omit_counts = False
        self.tool_call_ids = self._tool_call_ids
        self._stream_error = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        path, method = scope["path"], scope["method"]
        self.script.record(path, headers, body)
        failure = self.script.next_failure()
        if failure is not None:
            return await _send_json(send, failure.status, failure.body, failure.headers)
        if await wait_or_disconnect(receive, self.script.delay):
            self.script.note_cancelled()
            return None
        if path == "/api/chat" and method == "POST":
            return await self._chat(body, send, receive)
        if path == "/api/embed" and method == "POST":
            return await self._embed(body, send)
        if path == "/api/tags" and method == "GET":
            return await _send_json(send, 200, self._tags())
        # Gin's own answer for a route it does not have.
        return await _send(send, 404, b"404 page not found", b"text/plain")

    def _unknown(self, model: str) -> Failure | None:
        if _full_name(model) in self.models:
            return None
        return ollama_error(404, f'model "{model}" not found, try pulling it first')

    def _tags(self) -> bytes:
        models = [
            {
                "name": name,
                "model": name,
                "modified_at": _now(),
                "size": 4_661_224_676,
                "digest": "365c0bd3c000a25d28ddbf732fe1c6add414de7275464c4e4d1c3b5fcb5d8ad1",
                "details": {
                    "parent_model": "",
                    "format": "gguf",
                    "family": "llama",
                    "families": ["llama"],
                    "parameter_size": "8.0B",
                    "quantization_level": "Q4_0",
                },
            }
            for name in sorted(self.models)
        ]
        return msgspec.json.encode({"models": models})

    async def _chat(self, body: bytes, send: Any, receive: Any) -> None:
        try:
            chat = msgspec.json.decode(body, type=_Chat)
        except msgspec.DecodeError as exc:
            failure = ollama_error(400, str(exc))
            return await _send_json(send, failure.status, failure.body)
        unknown = self._unknown(chat.model)
        if unknown is not None:
            return await _send_json(send, unknown.status, unknown.body)
        last = chat.messages[-1] if chat.messages else None
        calls: list[dict[str, Any]] = []
        words: list[str] = []
        if chat.tools and (last is None or last.role != "tool"):
            call: dict[str, Any] = {
                "function": {"name": chat.tools[0].function.name, "arguments": {"city": "Paris"}}
            }
            if self.tool_call_ids:
                call["id"] = "call_mock0001"
            calls.append(call)
        else:
            user = next((m for m in reversed(chat.messages) if m.role in ("user", "tool")), None)
            words = ("mock says: " + (user.content if user else "")).split(" ")
        limit = (chat.options or {}).get("num_predict")
        done_reason = "stop"
        if isinstance(limit, int) and 0 <= limit < len(words):
            words, done_reason = words[:limit], "length"
        prompt_tokens = sum(len(m.content.split()) + 3 for m in chat.messages)
        counts = {
            "total_duration": 5_191_566_416,
            "load_duration": 2_154_458,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": 383_809_000,
            "eval_count": len(words) or 12,
            "eval_duration": 4_799_921_000,
        }
        if self.omit_counts:
            del counts["prompt_eval_count"], counts["eval_count"]
        if chat.stream:
            return await self._stream(chat.model, words, calls, done_reason, counts, send, receive)
        message: dict[str, Any] = {"role": "assistant", "content": " ".join(words)}
        if calls:
            message["tool_calls"] = calls
        answer = {
            "model": chat.model,
            "created_at": _now(),
            "message": message,
            "done_reason": done_reason,
            "done": True,
            **counts,
        }
        await _send_json(send, 200, msgspec.json.encode(answer))

    async def _stream(
        self,
        model: str,
        words: list[str],
        calls: list[dict[str, Any]],
        done_reason: str,
        counts: dict[str, int],
        send: Any,
        receive: Any,
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/x-ndjson")],
            }
        )

        def line(message: dict[str, Any], **extra: Any) -> bytes:
            body = {"model": model, "created_at": _now(), "message": message, **extra}
            return msgspec.json.encode(body) + b"\n"

        pieces = [
            line({"role": "assistant", "content": word if i == 0 else " " + word}, done=False)
            for i, word in enumerate(words)
        ]
        if calls:
            # Ollama sends each tool call whole, in one line.
            pieces.append(
                line({"role": "assistant", "content": "", "tool_calls": calls}, done=False)
            )
        failure, self._stream_error = self._stream_error, None
        if failure is not None:
            message, after = failure
            pieces = [*pieces[:after], msgspec.json.encode({"error": message}) + b"\n"]
        else:
            last = {"role": "assistant", "content": ""}
            pieces.append(line(last, done_reason=done_reason, done=True, **counts))
        cut = self.script.cut_stream_after
        if cut is not None:
            pieces = pieces[:cut]
        await send_stream(self.script, receive, send, pieces)

    async def _embed(self, body: bytes, send: Any) -> None:
        try:
            request = msgspec.json.decode(body, type=_Embed)
        except msgspec.DecodeError as exc:
            failure = ollama_error(400, str(exc))
            return await _send_json(send, failure.status, failure.body)
        unknown = self._unknown(request.model)
        if unknown is not None:
            return await _send_json(send, unknown.status, unknown.body)
        inputs = [request.input] if isinstance(request.input, str) else request.input
        dims = request.dimensions or 8
        answer: dict[str, Any] = {
            "model": request.model,
            "embeddings": [mock_vector(text, i, dims) for i, text in enumerate(inputs)],
            "total_duration": 14_143_917,
            "load_duration": 1_019_500,
            "prompt_eval_count": sum(len(text.split()) for text in inputs),
        }
        if self.omit_counts:
            del answer["prompt_eval_count"]
        await _send_json(send, 200, msgspec.json.encode(answer))


async def _send_json(
    send: Any, status: int, body: bytes, headers: dict[str, str] | None = None
) -> None:
    await _send(send, status, body, b"application/json; charset=utf-8", headers)


async def _send(
    send: Any,
    status: int,
    body: bytes,
    content_type: bytes,
    headers: dict[str, str] | None = None,
) -> None:
    raw_headers = [(b"content-type", content_type)]
    raw_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})
