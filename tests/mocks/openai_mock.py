"""A mock OpenAI (and Azure OpenAI) server speaking the real wire format.

Plain and streamed chat completions (SSE, `stream_options.include_usage`, tool-call deltas;
with a `response_format`, the answer is the last user message itself; a word of the answer
that is one of the `stop` sequences ends it, and with `reports_stop` the choice names it in
`stop_reason`, as vLLM does), the Responses API (`/v1/responses`, plain and streamed, as
`tests/mocks/responses_mock.py` says; not for Azure's deployment paths),
embeddings (float and base64), legacy text completions (`/v1/completions`), image
generations (`/v1/images/generations`, b64_json or url), `/v1/models`, and OpenAI's error
bodies. Hostile knobs: `extra_images` sends that many images more than asked, and
`completion_usage` replaces a completion's usage object with what a test gives. Azure's
`/openai/deployments/{name}/…?api-version=…` paths with the `api-key` header are served too.
A raw ASGI app so that benchmarks measure the gateway, not the mock.
"""

from __future__ import annotations

import base64
import struct
import time
from typing import Any

import msgspec

from tests.mocks import responses_mock
from tests.mocks.script import Failure, MockScript, read_body, send_stream, wait_or_disconnect


class _Msg(msgspec.Struct):
    role: str
    content: Any = None


class _Fn(msgspec.Struct):
    name: str


class _Tool(msgspec.Struct):
    function: _Fn


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Chat(msgspec.Struct):
    model: str
    messages: list[_Msg]
    stream: bool = False
    stream_options: _StreamOptions | None = None
    tools: list[_Tool] | None = None
    tool_choice: Any = None
    max_tokens: int | None = None
    response_format: Any = None
    stop: str | list[str] | None = None


class _Embed(msgspec.Struct):
    model: str
    input: Any
    encoding_format: str = "float"
    dimensions: int | None = None


class _Completion(msgspec.Struct):
    model: str
    prompt: Any = ""
    max_tokens: int = 16
    n: int = 1
    best_of: int | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None


class _ImageGen(msgspec.Struct):
    prompt: str
    model: str = "dall-e-2"
    n: int = 1
    size: str = "1024x1024"
    response_format: str = "url"


# A 1x1 transparent PNG, as OpenAI's `b64_json`.
PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAA"
    "AABJRU5ErkJggg=="
)


def openai_error(status: int, message: str, type_: str, code: str | None = None) -> Failure:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return Failure(status, msgspec.json.encode(body))


RATE_LIMITED = openai_error(
    429, "Rate limit reached for requests", "requests", "rate_limit_exceeded"
)
SERVER_ERROR = openai_error(500, "The server had an error processing your request.", "server_error")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def _images(content: Any) -> int:
    if not isinstance(content, list):
        return 0
    return sum(1 for part in content if isinstance(part, dict) and part.get("type") == "image_url")


class OpenAIMock:
    def __init__(
        self,
        api_key: str | None = "sk-mock",
        script: MockScript | None = None,
        image_tokens: int = 0,
        extra_images: int = 0,
        completion_usage: Any = None,
        reports_stop: bool = False,
        responses_usage: Any = None,
        responses_padding: int = 0,
    ) -> None:
        self.api_key = api_key
        self.script = script or MockScript()
        # Prompt tokens billed for each image part, as a vision model bills them.
        self.image_tokens = image_tokens
        self.extra_images = extra_images
        self.completion_usage = completion_usage
        # vLLM's `stop_reason`: the stop string that ended a choice.
        self.reports_stop = reports_stop
        # Hostile knobs of the Responses API: its usage object, a padded text delta.
        self.responses_usage = responses_usage
        self.responses_padding = responses_padding

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        path = scope["path"]
        self.script.record(path, headers, body)
        if not self._authorised(path, headers):
            failure = openai_error(
                401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"
            )
            return await self._send_failure(send, failure)
        failure = self.script.next_failure()
        if failure is not None:
            return await self._send_failure(send, failure)
        if await wait_or_disconnect(receive, self.script.delay):
            self.script.note_cancelled()
            return None
        if path.endswith("/chat/completions"):
            return await self._chat(body, send, receive)
        if path.endswith("/responses") and scope["method"] == "POST":
            return await self._responses(body, send, receive)
        if path.endswith("/completions"):
            return await self._completion(body, send, receive)
        if path.endswith("/images/generations"):
            return await self._image_generation(body, send)
        if path.endswith("/embeddings"):
            return await self._embeddings(body, send)
        if path.endswith("/models") and scope["method"] == "GET":
            models = {"object": "list", "data": [{"id": "mock-model", "object": "model"}]}
            return await _send_json(send, 200, msgspec.json.encode(models))
        return await self._send_failure(
            send, openai_error(404, f"Unknown path {path}", "invalid_request_error")
        )

    def _authorised(self, path: str, headers: dict[str, str]) -> bool:
        if self.api_key is None:
            return True
        if path.startswith("/openai/"):
            return headers.get("api-key") == self.api_key
        return headers.get("authorization") == f"Bearer {self.api_key}"

    async def _send_failure(self, send: Any, failure: Failure) -> None:
        await _send_json(send, failure.status, failure.body, failure.headers)

    async def _chat(self, body: bytes, send: Any, receive: Any) -> None:
        try:
            chat = msgspec.json.decode(body, type=_Chat)
        except msgspec.ValidationError as exc:
            failure = openai_error(400, str(exc), "invalid_request_error")
            return await self._send_failure(send, failure)
        last = next((m for m in reversed(chat.messages) if m.role == "user"), None)
        words = ("mock says: " + _text(last.content if last else "")).split(" ")
        if chat.response_format:
            # Structured output: the user's own text, which a test writes as the JSON it wants.
            words = _text(last.content if last else "").split(" ")
        stops = [chat.stop] if isinstance(chat.stop, str) else chat.stop or []
        matched = next((word for word in words if word in stops), None)
        if matched is not None:
            words = words[: words.index(matched)]
        if chat.max_tokens:
            words = words[: chat.max_tokens]
        stop_reason = {"stop_reason": matched} if self.reports_stop else {}
        prompt_tokens = sum(len(_text(m.content).split()) + 3 for m in chat.messages)
        prompt_tokens += self.image_tokens * sum(_images(m.content) for m in chat.messages)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words),
        }
        tool = None
        if chat.tools and chat.tool_choice != "none":
            tool = chat.tools[0].function.name
        if chat.stream:
            return await self._stream(chat, words, tool, usage, send, receive, stop_reason)
        message: dict[str, Any] = {"role": "assistant", "content": " ".join(words)}
        finish = "stop"
        if tool:
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_mock1",
                        "type": "function",
                        "function": {"name": tool, "arguments": '{"city":"Paris"}'},
                    }
                ],
            }
            finish = "tool_calls"
        answer = {
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": chat.model,
            "system_fingerprint": "fp_mock",
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": finish,
                    **stop_reason,
                }
            ],
            "usage": usage,
        }
        await _send_json(send, 200, msgspec.json.encode(answer))

    async def _stream(
        self,
        chat: _Chat,
        words: list[str],
        tool: str | None,
        usage: dict[str, int],
        send: Any,
        receive: Any,
        stop_reason: dict[str, Any],
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            choices = [{**choice, **stop_reason} if finish else choice]
            body = {
                "id": "chatcmpl-mock",
                "object": "chat.completion.chunk",
                "created": created,
                "model": chat.model,
                "system_fingerprint": "fp_mock",
                "choices": choices,
                **extra,
            }
            return b"data: " + msgspec.json.encode(body) + b"\n\n"

        pieces = [chunk({"role": "assistant", "content": ""})]
        if tool:
            call = {"index": 0, "id": "call_mock1", "type": "function"}
            pieces.append(
                chunk({"tool_calls": [{**call, "function": {"name": tool, "arguments": ""}}]})
            )
            for part in ('{"city"', ':"Paris"}'):
                pieces.append(
                    chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]})
                )
            finish = "tool_calls"
        else:
            for i, word in enumerate(words):
                pieces.append(chunk({"content": word if i == 0 else " " + word}))
            finish = "stop"
        pieces.append(chunk({}, finish))
        include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
        if include_usage:
            body = {
                "id": "chatcmpl-mock",
                "object": "chat.completion.chunk",
                "created": created,
                "model": chat.model,
                "choices": [],
                "usage": usage,
            }
            pieces.append(b"data: " + msgspec.json.encode(body) + b"\n\n")
        pieces.append(b"data: [DONE]\n\n")
        cut = self.script.cut_stream_after
        if cut is not None:
            pieces = pieces[: cut + 1]
        await send_stream(self.script, receive, send, pieces)

    async def _responses(self, body: bytes, send: Any, receive: Any) -> None:
        try:
            request = responses_mock.decode_request(body)
        except msgspec.ValidationError as exc:
            failure = openai_error(400, str(exc), "invalid_request_error")
            return await self._send_failure(send, failure)
        refused = responses_mock.refusal(request)
        if refused is not None:
            return await self._send_failure(send, refused)
        answer = responses_mock.answer(request, self.responses_usage)
        if request.stream:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            events = responses_mock.stream_events(answer, self.responses_padding)
            cut = self.script.cut_stream_after
            if cut is not None:
                events = events[:cut]
            return await send_stream(self.script, receive, send, events)
        response = responses_mock.response_object(
            answer, "resp_mock", answer.status, answer.output, answer.usage
        )
        await _send_json(send, 200, msgspec.json.encode(response))

    async def _completion(self, body: bytes, send: Any, receive: Any) -> None:
        try:
            request = msgspec.json.decode(body, type=_Completion)
        except msgspec.ValidationError as exc:
            failure = openai_error(400, str(exc), "invalid_request_error")
            return await self._send_failure(send, failure)
        prompt = request.prompt if isinstance(request.prompt, str) else str(request.prompt)
        words = ("mock completes: " + prompt).split(" ")[: request.max_tokens]
        choices = [
            {"text": " ".join(words), "index": index, "logprobs": None, "finish_reason": "length"}
            for index in range(request.n)
        ]
        prompt_tokens = len(prompt.split())
        completion_tokens = len(words) * max(request.n, request.best_of or 1)
        usage = self.completion_usage or {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        answer = {
            "id": "cmpl-mock",
            "object": "text_completion",
            "created": int(time.time()),
            "model": request.model,
            "system_fingerprint": "fp_mock",
            "choices": choices,
            "usage": usage,
        }
        if request.stream:
            return await self._completion_stream(request, answer, words, send, receive)
        await _send_json(send, 200, msgspec.json.encode(answer))

    async def _completion_stream(
        self,
        request: _Completion,
        answer: dict[str, Any],
        words: list[str],
        send: Any,
        receive: Any,
    ) -> None:
        """OpenAI's streamed completion: a chunk per word per choice, each choice's last with
        its finish reason, the usage chunk if asked, `[DONE]`."""
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            body = {**answer, "choices": choices, **extra}
            del body["usage"]
            body.update(extra)
            return b"data: " + msgspec.json.encode(body) + b"\n\n"

        pieces = []
        for index in range(request.n):
            for number, word in enumerate(words):
                text = word if number == 0 else " " + word
                done = "length" if number == len(words) - 1 else None
                piece = {"text": text, "index": index, "logprobs": None, "finish_reason": done}
                pieces.append(chunk([piece]))
        if request.stream_options and request.stream_options.include_usage:
            pieces.append(chunk([], usage=answer["usage"]))
        pieces.append(b"data: [DONE]\n\n")
        cut = self.script.cut_stream_after
        if cut is not None:
            pieces = pieces[:cut]
        await send_stream(self.script, receive, send, pieces)

    async def _image_generation(self, body: bytes, send: Any) -> None:
        try:
            request = msgspec.json.decode(body, type=_ImageGen)
        except msgspec.ValidationError as exc:
            failure = openai_error(400, str(exc), "invalid_request_error")
            return await self._send_failure(send, failure)
        image: dict[str, Any] = {"revised_prompt": request.prompt}
        if request.response_format == "b64_json":
            image["b64_json"] = PNG_B64
        else:
            image["url"] = "https://images.example/mock.png"
        answer = {"created": int(time.time()), "data": [image] * (request.n + self.extra_images)}
        await _send_json(send, 200, msgspec.json.encode(answer))

    async def _embeddings(self, body: bytes, send: Any) -> None:
        try:
            request = msgspec.json.decode(body, type=_Embed)
        except msgspec.ValidationError as exc:
            failure = openai_error(400, str(exc), "invalid_request_error")
            return await self._send_failure(send, failure)
        inputs = request.input if isinstance(request.input, list) else [request.input]
        if inputs and not isinstance(inputs[0], str):
            inputs = [str(inputs)]
        dims = request.dimensions or 8
        data = []
        for index, text in enumerate(inputs):
            vector = [((len(text) + index + d) % 7) / 7.0 for d in range(dims)]
            encoded: Any = vector
            if request.encoding_format == "base64":
                encoded = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        tokens = sum(len(text.split()) for text in inputs)
        answer = {
            "object": "list",
            "data": data,
            "model": request.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        await _send_json(send, 200, msgspec.json.encode(answer))


async def _send_json(
    send: Any, status: int, body: bytes, headers: dict[str, str] | None = None
) -> None:
    raw_headers = [(b"content-type", b"application/json")]
    raw_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})
