"""A mock Anthropic server speaking the Messages API's real wire format.

`POST /v1/messages` answers `mock says: <the last user text or tool result>`, one word per
token; `max_tokens` cuts the answer (`stop_reason: "max_tokens"`) and a word that is one of the
`stop_sequences` ends it (`"stop_sequence"`). Given tools (and a `tool_choice` other than
`none`), it says `Let me check.` and calls every offered tool (only the named one for
`{"type": "tool"}`, only the first with `disable_parallel_tool_use`, and without the words for
`any`/`tool`, as Claude does): `{"city": "Paris"}` for a tool whose schema has properties, `{}`
otherwise. With `"stream": true` it sends Anthropic's SSE events (`message_start`, `ping`,
`content_block_*`, tool input in `input_json_delta` fragments, `message_delta`,
`message_stop`).

With `thinking` enabled it thinks first, as Claude does: a `thinking` block with its
`signature` (streamed as `thinking_delta` and `signature_delta`), and it takes thinking blocks
back in an assistant turn. `document` blocks are read; with `citations` enabled on one, the
answer's text cites it (`citations`, streamed as a `citations_delta`). `cache_control` is
taken on every block. Hostile knob: `usage` replaces the counts of every answer's usage.

Like the real API it checks the `x-api-key` and `anthropic-version` headers, refuses unknown
fields and a missing `max_tokens`, refuses a `tool_result` that answers no `tool_use` of the
message before it, and answers an unknown model with `not_found_error`. Every request is
recorded in the script, which also queues failures and delays. A raw ASGI app so that
benchmarks measure the gateway, not the mock.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from tests.mocks.script import Failure, MockScript, read_body, send_stream, wait_or_disconnect

API_VERSION = "2023-06-01"
# The versions the mock answers (the official SDK of late 2026 sends the last, which a node
# passes on); like the API it refuses any other. Its wire is the same for all of them.
API_VERSIONS = ("2023-01-01", "2023-06-01", "2026-10-21")

# --- the request, as strictly as Anthropic reads it -------------------------------------------


class _Text(Struct, tag_field="type", tag="text", forbid_unknown_fields=True):
    text: Annotated[str, Meta(min_length=1)]
    cache_control: dict[str, Any] | None = None
    # An earlier answer's citations, handed back with its text.
    citations: list[dict[str, Any]] | None = None


class _Base64(Struct, tag_field="type", tag="base64", forbid_unknown_fields=True):
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str


class _Url(Struct, tag_field="type", tag="url", forbid_unknown_fields=True):
    url: str


class _Image(Struct, tag_field="type", tag="image", forbid_unknown_fields=True):
    source: _Base64 | _Url
    cache_control: dict[str, Any] | None = None


class _TextSource(Struct, tag_field="type", tag="text", forbid_unknown_fields=True):
    media_type: Literal["text/plain"]
    data: str


class _Citations(Struct, forbid_unknown_fields=True):
    enabled: bool = False


class _Document(Struct, tag_field="type", tag="document", forbid_unknown_fields=True):
    source: _TextSource | _Base64 | _Url
    title: str | None = None
    context: str | None = None
    citations: _Citations | None = None
    cache_control: dict[str, Any] | None = None


class _Thinking(Struct, tag_field="type", tag="thinking", forbid_unknown_fields=True):
    thinking: str
    signature: str


class _ThinkingConfig(Struct, forbid_unknown_fields=True):
    type: Literal["enabled", "disabled"]
    budget_tokens: Annotated[int, Meta(ge=1024)] | None = None


class _ToolUse(Struct, tag_field="type", tag="tool_use", forbid_unknown_fields=True):
    id: str
    name: str
    # Anthropic refuses a JSON string here, so the mock does too.
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None


class _ToolResult(Struct, tag_field="type", tag="tool_result", forbid_unknown_fields=True):
    tool_use_id: str
    content: str | list[_Text | _Image] = ""
    is_error: bool = False
    cache_control: dict[str, Any] | None = None


_Block = _Text | _Image | _Document | _Thinking | _ToolUse | _ToolResult


class _Message(Struct, forbid_unknown_fields=True):
    role: Literal["user", "assistant"]
    content: str | list[_Block]


class _Tool(Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    input_schema: dict[str, Any]
    description: str | None = None
    cache_control: dict[str, Any] | None = None


class _ToolChoice(Struct, forbid_unknown_fields=True):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class _Metadata(Struct, forbid_unknown_fields=True):
    user_id: str | None = None


class _Request(Struct, forbid_unknown_fields=True):
    model: str
    max_tokens: Annotated[int, Meta(ge=1)]
    messages: Annotated[list[_Message], Meta(min_length=1)]
    system: str | list[_Text] | None = None
    tools: list[_Tool] | None = None
    tool_choice: _ToolChoice | None = None
    stop_sequences: list[str] | None = None
    temperature: Annotated[float, Meta(ge=0, le=1)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    top_k: Annotated[int, Meta(ge=0)] | None = None
    metadata: _Metadata | None = None
    thinking: _ThinkingConfig | None = None
    stream: bool = False

    def __post_init__(self) -> None:
        budget = self.thinking.budget_tokens if self.thinking else None
        if budget is not None and budget >= self.max_tokens:
            raise ValueError("`max_tokens` must be greater than `thinking.budget_tokens`")


# --- errors -----------------------------------------------------------------------------------


def anthropic_error(
    status: int, type_: str, message: str, headers: dict[str, str] | None = None
) -> Failure:
    body = {"type": "error", "error": {"type": type_, "message": message}}
    return Failure(status, msgspec.json.encode(body), headers or {})


# Each error Anthropic documents, with its status and a message in its own words.
INVALID_REQUEST = anthropic_error(400, "invalid_request_error", "messages: field required")
AUTHENTICATION = anthropic_error(401, "authentication_error", "invalid x-api-key")
PERMISSION = anthropic_error(
    403, "permission_error", "Your API key does not have permission to use the specified resource."
)
NOT_FOUND = anthropic_error(404, "not_found_error", "model: claude-nope")
RATE_LIMITED = anthropic_error(
    429,
    "rate_limit_error",
    "This request would exceed the rate limit for your organization of 50 requests per minute.",
    {"retry-after": "7"},
)
API_ERROR = anthropic_error(500, "api_error", "Internal server error")
OVERLOADED = anthropic_error(529, "overloaded_error", "Overloaded")
PROMPT_TOO_LONG = anthropic_error(
    400, "invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"
)


# --- the mock ---------------------------------------------------------------------------------


THOUGHT = "Let me think."
SIGNATURE = "sig-mock-1"


class _Answer(Struct):
    words: list[str]
    calls: list[dict[str, Any]]
    stop_reason: str
    stop_sequence: str | None
    input_tokens: int
    thinks: bool = False
    # A cited document's text (its index 0), when one asked for citations.
    cited: str | None = None


def _text_of(content: str | list[Any]) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for block in content:
        if isinstance(block, _Text):
            texts.append(block.text)
        elif isinstance(block, _ToolResult):
            texts.append(_text_of(block.content))
    return " ".join(texts)


def _blocks(message: _Message) -> list[Any]:
    return [] if isinstance(message.content, str) else message.content


def _orphan_tool_result(messages: list[_Message]) -> str | None:
    """The id of a `tool_result` that answers no `tool_use` of the message before it."""
    previous: set[str] = set()
    for message in messages:
        for block in _blocks(message):
            if isinstance(block, _ToolResult) and block.tool_use_id not in previous:
                return block.tool_use_id
        previous = {block.id for block in _blocks(message) if isinstance(block, _ToolUse)}
    return None


class AnthropicMock:
    def __init__(
        self,
        script: MockScript | None = None,
        models: tuple[str, ...] = ("claude-mock",),
        api_key: str | None = "sk-ant-mock",
    ) -> None:
        self.script = script or MockScript()
        self.models = set(models)
        self.api_key = api_key
        # Prompt tokens served from, or written to, the prompt cache: counted beside
        # `input_tokens` by Anthropic.
        self.cache_read = 0
        self.cache_write = 0
        self._stream_error: tuple[str, str, int] | None = None
        self._messages = 0
        # Replaces the counts of every answer's usage (a hostile upstream's lies).
        self.usage: dict[str, Any] | None = None

    def fail_stream_next(self, error_type: str, message: str, after: int) -> None:
        """Make the next stream send `after` events, then `event: error` with this error."""
        self._stream_error = (error_type, message, after)

    def reset(self) -> None:
        """Forget requests, queued failures and switches, as between two tests."""
        self.script = MockScript()
        self.cache_read = self.cache_write = 0
        self._stream_error = None
        self._messages = 0
        self.usage = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        path, method = scope["path"], scope["method"]
        self.script.record(path, headers, body)
        failure = self.script.next_failure()
        if failure is not None:
            return await _send_failure(send, failure)
        if await wait_or_disconnect(receive, self.script.delay):
            self.script.note_cancelled()
            return None
        if path != "/v1/messages" or method != "POST":
            return await _send_failure(send, anthropic_error(404, "not_found_error", "Not Found"))
        if self.api_key is not None and headers.get("x-api-key") != self.api_key:
            return await _send_failure(send, AUTHENTICATION)
        if headers.get("anthropic-version") not in API_VERSIONS:
            refusal = anthropic_error(
                400, "invalid_request_error", "anthropic-version: header is required"
            )
            return await _send_failure(send, refusal)
        return await self._messages_call(body, send, receive)

    async def _messages_call(self, body: bytes, send: Any, receive: Any) -> None:
        try:
            request = msgspec.json.decode(body, type=_Request)
        except msgspec.ValidationError as exc:
            failure = anthropic_error(400, "invalid_request_error", str(exc))
            return await _send_failure(send, failure)
        except msgspec.DecodeError as exc:
            failure = anthropic_error(400, "invalid_request_error", f"invalid JSON: {exc}")
            return await _send_failure(send, failure)
        if request.model not in self.models:
            failure = anthropic_error(404, "not_found_error", f"model: {request.model}")
            return await _send_failure(send, failure)
        orphan = _orphan_tool_result(request.messages)
        if orphan is not None:
            message = (
                f"messages: unexpected `tool_use_id` found in `tool_result` blocks: {orphan}. "
                "Each `tool_result` block must have a corresponding `tool_use` block in the "
                "previous message."
            )
            return await _send_failure(send, anthropic_error(400, "invalid_request_error", message))
        self._messages += 1
        answer = self._answer(request)
        message_id = f"msg_mock{self._messages:04d}"
        if request.stream:
            return await self._stream(request, answer, message_id, send, receive)
        content: list[dict[str, Any]] = []
        if answer.thinks:
            content.append({"type": "thinking", "thinking": THOUGHT, "signature": SIGNATURE})
        if answer.words:
            text: dict[str, Any] = {"type": "text", "text": " ".join(answer.words)}
            if answer.cited is not None:
                text["citations"] = [_citation(answer.cited)]
            content.append(text)
        content += answer.calls
        reply = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": request.model,
            "content": content,
            "stop_reason": answer.stop_reason,
            "stop_sequence": answer.stop_sequence,
            "usage": {
                **self._input_usage(answer),
                "output_tokens": _output_tokens(answer),
                "service_tier": "standard",
                **(self.usage or {}),
            },
        }
        await _send(send, 200, msgspec.json.encode(reply), b"application/json", message_id)

    def _answer(self, request: _Request) -> _Answer:
        answer = self._plain_answer(request)
        answer.thinks = request.thinking is not None and request.thinking.type == "enabled"
        documents = [
            block
            for message in request.messages
            for block in _blocks(message)
            if isinstance(block, _Document) and block.citations and block.citations.enabled
        ]
        if documents and isinstance(documents[0].source, _TextSource):
            answer.cited = documents[0].source.data
        return answer

    def _plain_answer(self, request: _Request) -> _Answer:
        system = _text_of(request.system) if request.system else ""
        input_tokens = len(system.split()) + sum(
            len(_text_of(m.content).split()) + 3 for m in request.messages
        )
        last = request.messages[-1]
        answered = any(isinstance(block, _ToolResult) for block in _blocks(last))
        choice = request.tool_choice or _ToolChoice("auto")
        if request.tools and choice.type != "none" and not answered:
            tools = request.tools
            if choice.type == "tool":
                tools = [tool for tool in tools if tool.name == choice.name]
            if choice.disable_parallel_tool_use:
                tools = tools[:1]
            calls = [
                {
                    "type": "tool_use",
                    "id": f"toolu_mock{self._messages:04d}{number}",
                    "name": tool.name,
                    "input": {"city": "Paris"} if tool.input_schema.get("properties") else {},
                }
                for number, tool in enumerate(tools)
            ]
            # Claude made to use a tool calls it without a word first.
            words = [] if choice.type in ("any", "tool") else ["Let", "me", "check."]
            return _Answer(words, calls, "tool_use", None, input_tokens)
        user = next((m for m in reversed(request.messages) if m.role == "user"), last)
        words = ("mock says: " + _text_of(user.content)).split(" ")
        stop_reason, stop_sequence = "end_turn", None
        for index, word in enumerate(words):
            if word in (request.stop_sequences or ()):
                words, stop_reason, stop_sequence = words[:index], "stop_sequence", word
                break
        if len(words) > request.max_tokens:
            words, stop_reason, stop_sequence = words[: request.max_tokens], "max_tokens", None
        return _Answer(words, [], stop_reason, stop_sequence, input_tokens)

    def _input_usage(self, answer: _Answer) -> dict[str, int]:
        return {
            "input_tokens": answer.input_tokens,
            "cache_creation_input_tokens": self.cache_write,
            "cache_read_input_tokens": self.cache_read,
        }

    async def _stream(
        self, request: _Request, answer: _Answer, message_id: str, send: Any, receive: Any
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"request-id", f"req_{message_id}".encode()),
                ],
            }
        )
        start = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": request.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**self._input_usage(answer), "output_tokens": 1},
        }
        events = [_event("message_start", message=start), _event("ping")]
        block = 0
        if answer.thinks:
            thinking = {"type": "thinking", "thinking": "", "signature": ""}
            events.append(_event("content_block_start", index=block, content_block=thinking))
            for delta in (
                {"type": "thinking_delta", "thinking": THOUGHT},
                {"type": "signature_delta", "signature": SIGNATURE},
            ):
                events.append(_event("content_block_delta", index=block, delta=delta))
            events.append(_event("content_block_stop", index=block))
            block += 1
        if answer.words:
            text = {"type": "text", "text": ""}
            events.append(_event("content_block_start", index=block, content_block=text))
            if answer.cited is not None:
                delta = {"type": "citations_delta", "citation": _citation(answer.cited)}
                events.append(_event("content_block_delta", index=block, delta=delta))
            for i, word in enumerate(answer.words):
                delta = {"type": "text_delta", "text": word if i == 0 else " " + word}
                events.append(_event("content_block_delta", index=block, delta=delta))
            events.append(_event("content_block_stop", index=block))
            block += 1
        for call in answer.calls:
            opening = {**call, "input": {}}
            events.append(_event("content_block_start", index=block, content_block=opening))
            if call["input"]:
                # Anthropic's first fragment is empty; the JSON then arrives in pieces that
                # split keys and values anywhere.
                for piece in ["", '{"city": ', '"Par', 'is"}']:
                    delta = {"type": "input_json_delta", "partial_json": piece}
                    events.append(_event("content_block_delta", index=block, delta=delta))
            events.append(_event("content_block_stop", index=block))
            block += 1
        final = {"stop_reason": answer.stop_reason, "stop_sequence": answer.stop_sequence}
        usage = {"output_tokens": _output_tokens(answer), **(self.usage or {})}
        events += [_event("message_delta", delta=final, usage=usage), _event("message_stop")]
        failure, self._stream_error = self._stream_error, None
        if failure is not None:
            error_type, message, after = failure
            error = {"type": error_type, "message": message}
            events = [*events[:after], _event("error", error=error)]
        cut = self.script.cut_stream_after
        if cut is not None:
            events = events[:cut]
        await send_stream(self.script, receive, send, events)


def _output_tokens(answer: _Answer) -> int:
    return len(answer.words) + 10 * len(answer.calls) + (3 if answer.thinks else 0)


def _citation(document: str) -> dict[str, Any]:
    return {
        "type": "char_location",
        "cited_text": document,
        "document_index": 0,
        "document_title": None,
        "start_char_index": 0,
        "end_char_index": len(document),
    }


def _event(kind: str, **fields: Any) -> bytes:
    """One SSE event in Anthropic's framing: the `event:` name repeats the data's `type`."""
    data = msgspec.json.encode({"type": kind, **fields})
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


async def _send_failure(send: Any, failure: Failure) -> None:
    await _send(send, failure.status, failure.body, b"application/json", None, failure.headers)


async def _send(
    send: Any,
    status: int,
    body: bytes,
    content_type: bytes,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> None:
    raw_headers = [(b"content-type", content_type)]
    if request_id is not None:
        raw_headers.append((b"request-id", f"req_{request_id}".encode()))
    raw_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})
