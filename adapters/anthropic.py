"""Anthropic's Messages API: `POST /v1/messages`, plain or streamed as SSE.

Requests are translated from OpenAI's format and answers back into it. What differs:

- The key travels as `x-api-key`, and every call names the API version it speaks
  (`anthropic-version`): a deployment's `api_version` if set, else the one a Messages client
  sent (the call's `forward_headers`), else the default. A client's `anthropic-beta` (the
  features it opts into) is passed on too.
- `max_tokens` is required, so the deployment's output cap is sent when the client set none.
- System (and `developer`) messages become the top-level `system` text; the rest must alternate
  user/assistant, so consecutive messages of one role are merged into one.
- Message content is a list of typed blocks. Assistant tool calls are `tool_use` blocks whose
  `input` is a JSON object, not a JSON string; tool results are `tool_result` blocks inside a
  user message. Images are `image` blocks with a base64 or a URL source.
- `tool_choice` is `auto`/`any`/`tool`/`none`; `parallel_tool_calls: false` is its
  `disable_parallel_tool_use`. `stop` is `stop_sequences`, `user` is `metadata.user_id`.
- Usage is `input_tokens`/`output_tokens`; tokens read from or written to the prompt cache are
  counted apart by Anthropic and added to the prompt tokens here, since they are input too.
- A stream is a sequence of typed events (`message_start`, `content_block_*`, `message_delta`,
  `message_stop`, `ping`, `error`), translated here into the gateway's neutral stream events
  (`adapters.events`), with no OpenAI JSON in between.

Fields Anthropic has no equivalent for (`n`, `seed`, the penalties, `response_format`, …) are
dropped, and a thinking model's `thinking` blocks are not passed on: OpenAI's chat format has no
place for them. Anthropic serves no embeddings.

A Messages client's own request (`ChatCall.native`, API `anthropic.messages`) is not
translated: it is sent as the client wrote it (`native_body`: only `model`, `max_tokens` and
`stream` set here), and Anthropic's answer comes back as it came (`ChatResult.native`, each
stream event a `NativeEvent`), so that `thinking`, `top_k`, `cache_control`, citations and
whatever Anthropic adds next reach the client. Its usage and errors are read exactly as in a
translated answer (the same Structs, the same untrusted counts).
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from typing import Any, TypeVar
from urllib.parse import unquote_to_bytes

import msgspec
from msgspec import Raw, Struct

from adapters.anthropic_blocks import Base64Source, ImageBlock, TextBlock, UrlSource
from adapters.events import (
    Event,
    Finish,
    NativeEvent,
    Start,
    TextDelta,
    ToolCallDelta,
    ToolCallFragment,
    UsageReport,
    native_event,
)
from adapters.http import (
    UpstreamClient,
    UpstreamResponse,
    build_request,
    decode_json,
    iter_sse,
    join_url,
    send,
)
from adapters.streams import CountedStream
from adapters.tokens import (
    NO_COUNT,
    completion_text,
    token_count,
    usage_or_estimate,
)
from adapters.types import (
    ChatCall,
    ChatCompletion,
    ChatRequest,
    ChatResult,
    Choice,
    CompletionCall,
    ContentPart,
    EmbedCall,
    EmbedResult,
    FunctionCall,
    ImageCall,
    Message,
    NamedToolChoice,
    NativeApi,
    ResponseMessage,
    ToolCall,
    Upstream,
    UpstreamError,
    WireResult,
    does_not_serve,
    error_status_for,
)

DEFAULT_BASE_URL = "https://api.anthropic.com"
# The version every current Anthropic API feature used here is documented under.
DEFAULT_API_VERSION = "2023-06-01"

T = TypeVar("T")

# --- Anthropic's wire types: the request ------------------------------------------------------

_EMPTY_OBJECT = Raw(b"{}")
_TRUE = Raw(b"true")
_FALSE = Raw(b"false")
MESSAGES_API: NativeApi = "anthropic.messages"
# Anthropic requires a schema for every tool; a tool without parameters takes an empty object.
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class _ToolUseBlock(Struct, tag_field="type", tag="tool_use"):
    id: str
    name: str
    # The client's JSON text goes out as it came, once checked to be an object.
    input: Raw


class _ToolResultBlock(Struct, tag_field="type", tag="tool_result"):
    tool_use_id: str
    content: str


_Block = TextBlock | ImageBlock | _ToolUseBlock | _ToolResultBlock


class _Message(Struct):
    role: str
    content: list[_Block]


class _Tool(Struct, omit_defaults=True):
    name: str
    input_schema: dict[str, Any]
    description: str | None = None


class _ToolChoice(Struct, omit_defaults=True):
    type: str
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class _Metadata(Struct):
    user_id: str


class MessagesRequest(Struct, omit_defaults=True, kw_only=True):
    """The Messages body. `model` is in the body on Anthropic's own API and in the URL on
    Vertex AI (`adapters.vertex`), which names its API version in the body instead."""

    model: str | None = None
    anthropic_version: str | None = None
    # No default, so always encoded: Anthropic refuses a request without it.
    max_tokens: int
    messages: list[_Message]
    system: str | None = None
    tools: list[_Tool] | None = None
    tool_choice: _ToolChoice | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    metadata: _Metadata | None = None
    stream: bool = False


# --- Anthropic's wire types: answers, stream events and errors --------------------------------


class _Usage(Struct):
    # All optional: a `message_delta` event repeats only the counts that changed. Untrusted:
    # read by `token_count` (see `_prompt_tokens`, `_output_tokens`).
    input_tokens: Raw = NO_COUNT
    output_tokens: Raw = NO_COUNT
    cache_creation_input_tokens: Raw = NO_COUNT
    cache_read_input_tokens: Raw = NO_COUNT


class _ContentBlock(Struct):
    """One block of an answer. A single loose type rather than a tagged union, because
    Anthropic adds block types (`thinking`, `server_tool_use`, …) that must not fail a decode."""

    type: str
    text: str | None = None
    thinking: str | None = None
    id: str | None = None
    name: str | None = None
    input: Raw = _EMPTY_OBJECT


class _MessagesResponse(Struct):
    id: str = ""
    content: list[_ContentBlock] = []
    stop_reason: str | None = None
    # The stop sequence that ended the answer; untrusted, so any shape is read, and only a
    # string kept (`_matched`).
    stop_sequence: Any = None
    usage: _Usage = msgspec.field(default_factory=_Usage)


class _ErrorDetail(Struct):
    type: str = ""
    message: str = ""


class _EventDelta(Struct):
    """The `delta` of a `content_block_delta` (typed) or of a `message_delta` (stop reason)."""

    type: str | None = None
    text: str | None = None
    partial_json: str | None = None
    thinking: str | None = None
    stop_reason: str | None = None
    stop_sequence: Any = None


class _Event(Struct):
    """Any stream event; its `type` says which of the other fields it carries."""

    type: str
    message: _MessagesResponse | None = None
    index: int | None = None
    content_block: _ContentBlock | None = None
    delta: _EventDelta | None = None
    usage: _Usage | None = None
    error: _ErrorDetail | None = None


class _ErrorBody(Struct):
    error: _ErrorDetail | None = None


_response_decoder = msgspec.json.Decoder(_MessagesResponse)
_event_decoder = msgspec.json.Decoder(_Event)
_error_decoder = msgspec.json.Decoder(_ErrorBody)
_arguments_decoder = msgspec.json.Decoder(dict[str, Any])

# The HTTP status Anthropic gives each error type, for errors that arrive inside a stream
# (which has already answered 200) and so must be classed by their type alone.
_STATUS_OF_ERROR_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}

# `prompt is too long: 210000 tokens > 200000 maximum`
_PROMPT_TOO_LONG = re.compile(r"^prompt is too long")


def _openai_code(error_type: str, message: str) -> str | None:
    """OpenAI's code for the same failure where it has one, so that clients written for
    OpenAI can tell these apart; otherwise Anthropic's own error type."""
    if error_type == "rate_limit_error":
        return "rate_limit_exceeded"
    if error_type == "not_found_error" and message.startswith("model:"):
        return "model_not_found"
    if error_type == "invalid_request_error" and _PROMPT_TOO_LONG.match(message):
        return "context_length_exceeded"
    return error_type or None


def anthropic_error_message(body: bytes) -> tuple[str, str | None]:
    """The (message, code) of Anthropic's `{"type": "error", "error": {...}}` body, or the
    body's text (a proxy in front of Anthropic may answer in its own words)."""
    try:
        detail = _error_decoder.decode(body).error
    except msgspec.DecodeError:
        detail = None
    if detail is None or not detail.message:
        return body[:500].decode(errors="replace").strip(), None
    return detail.message, _openai_code(detail.type, detail.message)


# --- OpenAI request -> Anthropic request ------------------------------------------------------


def _bad_request(message: str) -> UpstreamError:
    return UpstreamError(400, message, type="invalid_request_error")


def _image_source(url: str) -> Base64Source | UrlSource:
    if url.startswith(("https://", "http://")):
        # Anthropic fetches the image itself, so the gateway never fetches what clients name.
        return UrlSource(url)
    if not url.startswith("data:"):
        raise _bad_request("image_url must be an http(s) URL or a data: URL")
    header, comma, data = url.partition(",")
    if not comma:
        raise _bad_request("malformed data: URL in image_url")
    media_type = header[len("data:") :].split(";", 1)[0] or "application/octet-stream"
    if header.endswith(";base64"):
        return Base64Source(media_type, data)
    return Base64Source(media_type, base64.b64encode(unquote_to_bytes(data)).decode())


def _content_blocks(content: str | list[ContentPart] | None) -> list[_Block]:
    if content is None:
        return []
    if isinstance(content, str):
        # Anthropic refuses empty text blocks, and an empty message says nothing anyway.
        return [TextBlock(content)] if content else []
    blocks: list[_Block] = []
    for part in content:
        if part.type == "text":
            if part.text:
                blocks.append(TextBlock(part.text))
        elif part.type == "image_url" and part.image_url is not None:
            blocks.append(ImageBlock(_image_source(part.image_url.url)))
        else:
            raise _bad_request(f"an Anthropic model cannot take {part.type!r} content")
    return blocks


def _plain_text(content: str | list[ContentPart] | None, what: str) -> str:
    """The text of a message that Anthropic takes as a string (system prompt, tool result)."""
    if not isinstance(content, list):
        return content or ""
    if any(part.type != "text" for part in content):
        raise _bad_request(f"an Anthropic {what} can hold text only")
    return "\n".join(part.text or "" for part in content)


def _tool_use(call: ToolCall) -> _ToolUseBlock:
    text = call.function.arguments or "{}"
    try:
        _arguments_decoder.decode(text)
    except msgspec.DecodeError as exc:
        raise _bad_request(
            f"tool call {call.id or call.function.name!r}: arguments must be a JSON object"
        ) from exc
    if not call.id or not call.function.name:
        # Anthropic pairs every result with its call by id: a call without one is unusable.
        raise _bad_request("every assistant tool call needs an id and a function name")
    return _ToolUseBlock(call.id, call.function.name, Raw(text.encode()))


def _tool_result(message: Message) -> _ToolResultBlock:
    if not message.tool_call_id:
        raise _bad_request("a tool message needs the tool_call_id of the call it answers")
    return _ToolResultBlock(message.tool_call_id, _plain_text(message.content, "tool result"))


def _anthropic_messages(messages: list[Message]) -> tuple[str | None, list[_Message]]:
    """The `system` text and the alternating user/assistant messages for `messages`."""
    system: list[str] = []
    translated: list[_Message] = []
    for message in messages:
        blocks: list[_Block]
        if message.role in ("system", "developer"):
            # Anthropic has one system prompt, beside the conversation, not inside it.
            text = _plain_text(message.content, "system prompt")
            if text:
                system.append(text)
            continue
        if message.role == "assistant":
            role = "assistant"
            blocks = _content_blocks(message.content)
            blocks += [_tool_use(call) for call in message.tool_calls or ()]
        elif message.role in ("tool", "function"):
            # Tool results are what the user side tells the model, in Anthropic's view.
            role, blocks = "user", [_tool_result(message)]
        else:
            role, blocks = "user", _content_blocks(message.content)
        if not blocks:
            continue
        if translated and translated[-1].role == role:
            # Several tool results in a row (or a result then the user's words) are one turn.
            translated[-1].content.extend(blocks)
        else:
            translated.append(_Message(role, blocks))
    return "\n\n".join(system) or None, translated


def _anthropic_tools(request: ChatRequest) -> tuple[list[_Tool] | None, _ToolChoice | None]:
    if not request.tools:
        return None, None
    tools = [
        _Tool(
            tool.function.name,
            tool.function.parameters or _NO_PARAMETERS,
            tool.function.description,
        )
        for tool in request.tools
    ]
    choice = request.tool_choice
    if choice == "none":
        # The tools stay offered so that earlier calls in the conversation still make sense.
        return tools, _ToolChoice("none")
    single = True if request.parallel_tool_calls is False else None
    if isinstance(choice, NamedToolChoice):
        return tools, _ToolChoice("tool", choice.function.name, single)
    if choice == "required":
        return tools, _ToolChoice("any", disable_parallel_tool_use=single)
    if choice == "auto" or single:
        return tools, _ToolChoice("auto", disable_parallel_tool_use=single)
    return tools, None


def max_tokens_for(request: ChatRequest, upstream: Upstream) -> int:
    """The client's cap, bounded by the deployment's: the gateway reserves budget for at most
    the deployment's cap, so the model must not be allowed to write more."""
    cap = upstream.max_output_tokens
    return min(request.output_limit or cap, cap)


def chat_body(call: ChatCall, upstream: Upstream, *, stream: bool) -> bytes:
    """The `/v1/messages` request body for `call`."""
    body = messages_request(call, upstream, stream=stream)
    body.model = upstream.model
    return msgspec.json.encode(body)


def messages_request(call: ChatCall, upstream: Upstream, *, stream: bool) -> MessagesRequest:
    """`call` in Anthropic's Messages format, without the model (which Vertex AI names in its
    URL, Anthropic's own API in the body)."""
    request = call.request
    system, messages = _anthropic_messages(request.messages)
    tools, tool_choice = _anthropic_tools(request)
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    temperature = request.temperature
    if temperature is not None:
        # OpenAI's range is 0-2, Anthropic's 0-1: above 1 asks for the most random there is.
        temperature = min(temperature, 1.0)
    return MessagesRequest(
        max_tokens=max_tokens_for(request, upstream),
        messages=messages,
        system=system,
        tools=tools,
        tool_choice=tool_choice,
        stop_sequences=stop or None,
        temperature=temperature,
        top_p=request.top_p,
        metadata=_Metadata(request.user) if request.user else None,
        stream=stream,
    )


# --- Anthropic answer -> OpenAI answer --------------------------------------------------------

_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    # A server tool's long turn paused: the answer so far is complete as far as it goes.
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def _matched(stop_reason: str | None, stop_sequence: Any) -> str | None:
    """The stop sequence Anthropic says ended the answer, if it says so as a string."""
    if stop_reason == "stop_sequence" and isinstance(stop_sequence, str):
        return stop_sequence
    return None


def native_body(
    fields: dict[str, Raw],
    call: ChatCall,
    upstream: Upstream,
    *,
    stream: bool,
    vertex_version: str | None = None,
) -> bytes:
    """A Messages client's own request, as its upstream gets it: the deployment's model, the
    output cap the budget reserved (`max_tokens_for`), and whether it streams; every other
    field as the client sent it. Vertex AI (`vertex_version`) names the model in its URL and
    wants the API version in the body instead."""
    body = dict(fields)
    if vertex_version is None:
        body["model"] = Raw(msgspec.json.encode(upstream.model))
    else:
        body.pop("model", None)
        body["anthropic_version"] = Raw(msgspec.json.encode(vertex_version))
    body["max_tokens"] = Raw(str(max_tokens_for(call.request, upstream)).encode())
    body["stream"] = _TRUE if stream else _FALSE
    return msgspec.json.encode(body)


def _finish_reason(stop_reason: str | None, called_tools: bool) -> str:
    reason = _FINISH_REASONS.get(stop_reason or "", "stop")
    # OpenAI's clients look for `tool_calls` to know they have calls to run.
    return "tool_calls" if called_tools and reason == "stop" else reason


def _output_tokens(usage: _Usage) -> int | None:
    return token_count(usage.output_tokens)


def _prompt_tokens(usage: _Usage) -> int | None:
    input_tokens = token_count(usage.input_tokens)
    if input_tokens is None:
        return None
    # Cached prompt tokens are reported beside `input_tokens`, not inside it.
    cached = (token_count(usage.cache_creation_input_tokens) or 0) + (
        token_count(usage.cache_read_input_tokens) or 0
    )
    return input_tokens + cached


def _stream_error(upstream: Upstream, error: _ErrorDetail | None) -> UpstreamError:
    """An `error` event: classed by its type as the same error would be as an HTTP answer."""
    detail = error or _ErrorDetail("api_error", "unknown error")
    status, retryable = error_status_for(_STATUS_OF_ERROR_TYPE.get(detail.type, 500))
    return UpstreamError(
        status,
        f"{upstream.provider} upstream failed mid-stream: {detail.message or detail.type}",
        type="invalid_request_error" if status in (400, 404, 413, 422) else "upstream_error",
        code=_openai_code(detail.type, detail.message),
        retryable=retryable,
    )


class AnthropicAdapter:
    """Speaks Anthropic's `/v1/messages` at `base_url` (default `https://api.anthropic.com`).

    `adapters.vertex` reuses it for Anthropic's models on Vertex AI: the translation both
    ways and the stream are the same; the URL (`url`), the body (`body`), the credentials
    and the error bodies (`_send`) are Vertex's.
    """

    def __init__(self, upstream: Upstream, client: UpstreamClient) -> None:
        self.upstream = upstream
        self.client = client

    def url(self, *, stream: bool = False) -> str:
        base = (self.upstream.base_url or DEFAULT_BASE_URL).rstrip("/")
        # Anthropic's SDKs take the base without `/v1`, OpenAI's with it: accept either.
        return join_url(base, "messages" if base.endswith("/v1") else "v1/messages")

    def body(self, call: ChatCall, *, stream: bool) -> bytes:
        native = call.native_for(MESSAGES_API)
        if native is not None:
            return native_body(native, call, self.upstream, stream=stream)
        return chat_body(call, self.upstream, stream=stream)

    def headers(self, call: ChatCall) -> dict[str, str]:
        """The API version and beta features: the deployment's pinned version wins over the
        client's, which wins over the default; other adapters never see these."""
        forwarded = call.forward_headers
        version = (
            self.upstream.api_version or forwarded.get("anthropic-version") or DEFAULT_API_VERSION
        )
        headers = {"anthropic-version": version}
        if "anthropic-beta" in forwarded:
            headers["anthropic-beta"] = forwarded["anthropic-beta"]
        return headers

    async def _send(
        self, url: str, body: bytes, headers: dict[str, str], *, stream: bool
    ) -> UpstreamResponse:
        key = self.upstream.api_key
        if key:
            headers["x-api-key"] = key
        request = build_request(self.upstream, url, body, headers)
        return await send(
            self.client, self.upstream, request, stream=stream, parse_error=anthropic_error_message
        )

    async def _post(self, call: ChatCall, *, stream: bool = False) -> UpstreamResponse:
        body = self.body(call, stream=stream)
        return await self._send(self.url(stream=stream), body, self.headers(call), stream=stream)

    async def chat(self, call: ChatCall) -> ChatResult:
        response = await self._post(call)
        answer = decode_json(_response_decoder, response.content, self.upstream)
        if call.native_for(MESSAGES_API) is not None:
            return self._native_result(call, answer, response.content)
        text = "".join(block.text or "" for block in answer.content if block.type == "text")
        calls = [
            ToolCall(
                FunctionCall(block.name or "", bytes(block.input).decode()),
                id=block.id or f"call_{call.request_id}_{number}",
            )
            for number, block in enumerate(b for b in answer.content if b.type == "tool_use")
        ]
        usage, estimated = usage_or_estimate(
            _prompt_tokens(answer.usage),
            _output_tokens(answer.usage),
            call,
            completion_text(text, calls),
        )
        reply = ResponseMessage(
            # OpenAI's answers that call tools and say nothing have `content: null`.
            content=text or (None if calls else ""),
            tool_calls=calls or None,
        )
        completion = ChatCompletion(
            id=call.request_id,
            model=self.upstream.model,
            choices=[Choice(0, reply, _finish_reason(answer.stop_reason, bool(calls)))],
            usage=usage,
        )
        return ChatResult(
            completion=completion,
            usage=usage,
            usage_estimated=estimated,
            stop_sequence=_matched(answer.stop_reason, answer.stop_sequence),
        )

    def _native_result(
        self, call: ChatCall, answer: _MessagesResponse, content: bytes
    ) -> ChatResult:
        """Anthropic's answer as it came, for a Messages client; its usage read as always."""
        written = "".join(
            block.text or block.thinking or bytes(block.input).decode() for block in answer.content
        )
        usage, estimated = usage_or_estimate(
            _prompt_tokens(answer.usage), _output_tokens(answer.usage), call, written
        )
        return ChatResult(native=content, usage=usage, usage_estimated=estimated)

    async def open_stream(self, call: ChatCall) -> AnthropicStream:
        response = await self._post(call, stream=True)
        return AnthropicStream(call, self.upstream, response)

    async def complete(self, call: CompletionCall) -> WireResult:
        raise does_not_serve(self.upstream.provider, "legacy text completions")

    async def images(self, call: ImageCall) -> WireResult:
        raise does_not_serve(self.upstream.provider, "image generations")

    async def embed(self, call: EmbedCall) -> EmbedResult:
        raise UpstreamError(
            400,
            f"{self.upstream.model!r} is an Anthropic deployment, which serves no embeddings",
            type="invalid_request_error",
            code="model_not_supported",
        )


class AnthropicStream(CountedStream):
    """Anthropic's stream events, translated into neutral stream events, or for a Messages
    client's own request (`ChatCall.native`) passed on as they came (`NativeEvent`s).

    Nothing is yielded before the first content (the `Start` event, or the native
    `message_start` and `ping`, wait for it): Anthropic reports overload as an `error` event
    right after `message_start`, and as long as nothing has been yielded the router can still
    fall back to another deployment.
    """

    def __init__(self, call: ChatCall, upstream: Upstream, response: UpstreamResponse) -> None:
        super().__init__(call, upstream, response)
        # Whether the output count is `message_delta`'s final one, not `message_start`'s.
        self._completion_final = False
        self._stop_reason: str | None = None
        self._stop_sequence: Any = None
        self._started = False
        # Anthropic numbers all content blocks; OpenAI numbers tool calls only.
        self._tool_index: dict[int, int] = {}
        self._tool_has_arguments: dict[int, bool] = {}

    def _start(self) -> list[Event]:
        if self._started:
            return []
        self._started = True
        return [Start(self._call.request_id, self._upstream.model, self._created)]

    def _tool_delta(
        self, block: int, arguments: str, *, first: _ContentBlock | None = None
    ) -> ToolCallDelta:
        index = self._tool_index[block]
        if first is None:
            return ToolCallDelta([ToolCallFragment(index, arguments=arguments)])
        # The call's first piece names it; the arguments follow in fragments.
        call_id = first.id or f"call_{self._call.request_id}_{index}"
        return ToolCallDelta([ToolCallFragment(index, call_id, first.name or "", arguments)])

    def _note_usage(self, usage: _Usage | None) -> None:
        if usage is None:
            return
        prompt = _prompt_tokens(usage)
        if prompt is not None:
            self._prompt_count = prompt
        output = _output_tokens(usage)
        if output is not None:
            # Anthropic's output count is cumulative: the last one seen is the total.
            self._completion_count = output

    def _stream(self) -> AsyncIterator[Event]:
        native = self._call.native_for(MESSAGES_API) is not None
        return self._native_events() if native else self._events()

    def _completion_so_far(self, written: str) -> int:
        # Anthropic's final count, if it came, is the count: no estimate overrides it.
        if self._completion_final:
            return self._completion_count or 0
        return super()._completion_so_far(written)

    async def _events(self) -> AsyncIterator[Event]:
        async for sse in iter_sse(self._response, self._upstream):
            event = decode_json(_event_decoder, sse.data, self._upstream)
            kind = event.type
            if kind == "error":
                raise _stream_error(self._upstream, event.error)
            if kind == "message_start" and event.message is not None:
                self._note_usage(event.message.usage)
            elif kind == "content_block_start" and event.content_block is not None:
                for step in self._block_start(event.index or 0, event.content_block):
                    yield step
            elif kind == "content_block_delta" and event.delta is not None:
                for step in self._block_delta(event.index or 0, event.delta):
                    yield step
            elif kind == "content_block_stop":
                block = event.index or 0
                if block in self._tool_index and not self._tool_has_arguments[block]:
                    # A call without arguments: OpenAI's clients expect `{}`, not nothing.
                    self._tool_has_arguments[block] = True
                    yield self._tool_delta(block, "{}")
            elif kind == "message_delta":
                self._note_end(event)
            elif kind == "message_stop":
                self._response.complete()
                for step in self._finish():
                    yield step
                return
            # `ping`, and event types added after this adapter was written, are skipped:
            # Anthropic says clients must tolerate new ones.
        # No `message_stop`: the answer was cut off, not complete.
        raise UpstreamError(
            502, f"{self._upstream.provider} upstream stream ended early", retryable=True
        )

    def _note_end(self, event: _Event) -> None:
        """`message_delta`: the stop reason, and the final output count."""
        if event.delta is not None and event.delta.stop_reason is not None:
            self._stop_reason = event.delta.stop_reason
            self._stop_sequence = event.delta.stop_sequence
        if event.usage is None or _output_tokens(event.usage) is None:
            # The final count is missing or no count: `message_start`'s is not the total.
            self._completion_count = None
        self._note_usage(event.usage)
        self._completion_final = self._completion_count is not None

    async def _native_events(self) -> AsyncIterator[NativeEvent]:
        """Anthropic's events as they came, read only for the usage, the stop and errors;
        `message_start` and `ping` held back until content follows them (see the class)."""
        held: list[NativeEvent] = []
        async for sse in iter_sse(self._response, self._upstream):
            event = decode_json(_event_decoder, sse.data, self._upstream)
            kind = event.type
            if kind == "error":
                raise _stream_error(self._upstream, event.error)
            self._note_native(event)
            native = native_event(sse.event, sse.data)
            if not self._started and kind in ("message_start", "ping"):
                held.append(native)
                continue
            self._started = True
            for early in held:
                yield early
            held = []
            yield native
            if kind == "message_stop":
                self._response.complete()
                self._settle()
                return
        raise UpstreamError(
            502, f"{self._upstream.provider} upstream stream ended early", retryable=True
        )

    def _note_native(self, event: _Event) -> None:
        """What a passed-on event tells the books: counts, the stop, what was written (for an
        estimate if the stream is cut short)."""
        kind = event.type
        if kind == "message_start" and event.message is not None:
            self._note_usage(event.message.usage)
        elif kind == "content_block_delta" and event.delta is not None:
            delta = event.delta
            written = delta.text or delta.partial_json or delta.thinking
            if written:
                self._written.append(written)
        elif kind == "content_block_start" and event.content_block is not None:
            self._written.append(event.content_block.text or event.content_block.name or "")
        elif kind == "message_delta":
            self._note_end(event)

    def _block_start(self, block: int, content: _ContentBlock) -> list[Event]:
        if content.type == "text":
            if not content.text:
                return []
            self._written.append(content.text)
            return [*self._start(), TextDelta(content.text)]
        if content.type == "tool_use":
            self._tool_index[block] = len(self._tool_index)
            self._tool_has_arguments[block] = False
            self._written.append(content.name or "")
            return [*self._start(), self._tool_delta(block, "", first=content)]
        # Thinking and server-tool blocks have no place in OpenAI's chat format.
        return []

    def _block_delta(self, block: int, delta: _EventDelta) -> list[Event]:
        if delta.type == "thinking_delta" and delta.thinking:
            # Not shown to an OpenAI client, but written (and billed) all the same.
            self._written.append(delta.thinking)
            return []
        if delta.type == "text_delta" and delta.text:
            self._written.append(delta.text)
            return [*self._start(), TextDelta(delta.text)]
        if delta.type == "input_json_delta" and delta.partial_json and block in self._tool_index:
            self._tool_has_arguments[block] = True
            self._written.append(delta.partial_json)
            return [*self._start(), self._tool_delta(block, delta.partial_json)]
        return []

    def _settle(self) -> None:
        """The stream is complete: its usage is Anthropic's counts (each estimated if
        missing)."""
        written = "".join(self._written)
        self.usage, self.usage_estimated = usage_or_estimate(
            self._prompt_count, self._completion_count, self._call, written
        )

    def _finish(self) -> list[Event]:
        self._settle()
        reason = _finish_reason(self._stop_reason, bool(self._tool_index))
        matched = _matched(self._stop_reason, self._stop_sequence)
        events = [*self._start(), Finish(reason, stop_sequence=matched)]
        if self._call.request.include_usage:
            events.append(UsageReport(self.usage))
        return events

    async def aclose(self) -> None:
        await self._response.aclose()
