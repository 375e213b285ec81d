"""Ollama's native API: `/api/chat` (NDJSON streaming) and `/api/embed`.

Requests are translated from OpenAI's format and answers back into it. What differs:

- Ollama streams unless told otherwise, so `stream` is always sent.
- Sampling knobs live under `options`; `num_predict` is the output cap.
- Images travel beside the text as bare base64, one list per message.
- Tool-call arguments are JSON objects, not JSON strings. Older servers give calls no ids (the
  adapter makes them up), and a tool result names its tool (`tool_name`), not a call id.
- `format` is `"json"` or a JSON schema, in place of `response_format`.
- Usage is `prompt_eval_count`/`eval_count`. Servers before 0.2 left the prompt count out for
  a cached prompt; a missing count is estimated and the usage marked as such.

Fields Ollama has no equivalent for (`n`, `user`, `parallel_tool_calls`, …) are dropped, and a
thinking model's `thinking` text is not passed on: OpenAI's chat format has no place for it.
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from typing import Any, TypeVar
from urllib.parse import unquote_to_bytes

import msgspec
from msgspec import Raw, Struct

from adapters.events import (
    Event,
    Finish,
    Start,
    TextDelta,
    ToolCallDelta,
    ToolCallFragment,
    UsageReport,
)
from adapters.http import (
    UpstreamClient,
    UpstreamResponse,
    build_request,
    decode_json,
    iter_ndjson,
    join_url,
    send,
)
from adapters.streams import CountedStream
from adapters.tokens import (
    NO_COUNT,
    completion_text,
    estimate_text_tokens,
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
    Embedding,
    EmbeddingList,
    EmbeddingUsage,
    EmbedResult,
    FunctionCall,
    ImageCall,
    Message,
    NamedToolChoice,
    ResponseFormat,
    ResponseMessage,
    ToolCall,
    Upstream,
    UpstreamError,
    Usage,
    WireResult,
    does_not_serve,
    encode_embedding,
)

DEFAULT_BASE_URL = "http://127.0.0.1:11434"

T = TypeVar("T")

# --- Ollama's wire types ------------------------------------------------------------------

_EMPTY_OBJECT = Raw(b"{}")


class _Function(Struct):
    name: str
    # A JSON object, kept raw both ways: the client's JSON text goes out as it came (once
    # checked to be an object) and the model's comes back without a decode and re-encode.
    arguments: Raw = _EMPTY_OBJECT


class _ToolCall(Struct, omit_defaults=True):
    function: _Function
    # Newer servers id their calls; older ones do not.
    id: str | None = None


class _Message(Struct, omit_defaults=True):
    role: str
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[_ToolCall] | None = None
    tool_name: str | None = None
    # Newer servers read it to pair a result with its call; older ones ignore unknown fields.
    tool_call_id: str | None = None


class _ToolFunction(Struct, omit_defaults=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class _Tool(Struct, tag_field="type", tag="function"):
    # `type` is a tag so that it is always encoded, as in OpenAI's format that Ollama copies.
    function: _ToolFunction


class _Options(Struct, omit_defaults=True):
    num_predict: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class _ChatRequest(Struct, omit_defaults=True):
    model: str
    messages: list[_Message]
    # No default, so always encoded: Ollama streams when `stream` is absent.
    stream: bool
    options: _Options | None = None
    tools: list[_Tool] | None = None
    format: str | dict[str, Any] | None = None


class _ChatResponse(Struct):
    """A whole answer, or one line of a stream (the last has `done` and the counts)."""

    message: _Message | None = None
    done: bool = False
    done_reason: str | None = None
    # Untrusted: read by `token_count`.
    prompt_eval_count: Raw = NO_COUNT
    eval_count: Raw = NO_COUNT
    # A failure after the stream began: Ollama can only say so in a line of its own.
    error: str | None = None


class _EmbedRequest(Struct, omit_defaults=True):
    model: str
    input: str | list[str]
    dimensions: int | None = None


class _EmbedResponse(Struct):
    embeddings: list[list[float]]
    prompt_eval_count: Raw = NO_COUNT


class _ErrorBody(Struct):
    error: str | None = None


_chat_decoder = msgspec.json.Decoder(_ChatResponse)
_embed_decoder = msgspec.json.Decoder(_EmbedResponse)
_error_decoder = msgspec.json.Decoder(_ErrorBody)
_arguments_decoder = msgspec.json.Decoder(dict[str, Any])

# `model "x" not found, try pulling it first` (or `model 'x' not found` on some versions).
_MODEL_NOT_FOUND = re.compile(r"^model .+ not found")


def ollama_error_message(body: bytes) -> tuple[str, str | None]:
    """The (message, code) of Ollama's `{"error": "..."}` body, or the body's text."""
    try:
        message = _error_decoder.decode(body).error
    except msgspec.DecodeError:
        message = None
    if not message:
        return body[:500].decode(errors="replace").strip(), None
    # OpenAI's code for the same failure, so that clients can tell it from other 404s.
    return message, "model_not_found" if _MODEL_NOT_FOUND.match(message) else None


# --- OpenAI request -> Ollama request -----------------------------------------------------


def _bad_request(message: str) -> UpstreamError:
    return UpstreamError(400, message, type="invalid_request_error")


def _image_base64(url: str) -> str:
    """The bare base64 Ollama wants, from a `data:` URL."""
    if not url.startswith("data:"):
        # Fetching the URL for Ollama would make the gateway fetch whatever clients name.
        raise _bad_request("an Ollama model takes images only inline, as data: URLs")
    header, comma, data = url.partition(",")
    if not comma:
        raise _bad_request("malformed data: URL in image_url")
    if header.endswith(";base64"):
        return data
    return base64.b64encode(unquote_to_bytes(data)).decode()


def _text_and_images(content: str | list[ContentPart] | None) -> tuple[str, list[str]]:
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    texts: list[str] = []
    images: list[str] = []
    for part in content:
        if part.type == "text":
            texts.append(part.text or "")
        elif part.type == "image_url" and part.image_url is not None:
            images.append(_image_base64(part.image_url.url))
        else:
            raise _bad_request(f"an Ollama model cannot take {part.type!r} content")
    return "\n".join(texts), images


def _ollama_tool_call(call: ToolCall) -> _ToolCall:
    text = call.function.arguments or "{}"
    try:
        _arguments_decoder.decode(text)
    except msgspec.DecodeError as exc:
        raise _bad_request(
            f"tool call {call.id or call.function.name!r}: arguments must be a JSON object"
        ) from exc
    return _ToolCall(_Function(call.function.name or "", Raw(text.encode())), id=call.id)


def _ollama_messages(messages: list[Message]) -> list[_Message]:
    # OpenAI pairs a tool result with its call by id, Ollama by tool name: remember the names.
    tool_names: dict[str, str] = {}
    translated = []
    for message in messages:
        text, images = _text_and_images(message.content)
        if message.role in ("system", "developer"):
            # Ollama's templates know no `developer` role; it is OpenAI's new name for system.
            translated.append(_Message("system", text, images=images or None))
        elif message.role == "assistant":
            calls = message.tool_calls or []
            for call in calls:
                if call.id and call.function.name:
                    tool_names[call.id] = call.function.name
            translated.append(
                _Message(
                    "assistant",
                    text,
                    images=images or None,
                    tool_calls=[_ollama_tool_call(call) for call in calls] or None,
                )
            )
        elif message.role in ("tool", "function"):
            call_id = message.tool_call_id
            name = tool_names.get(call_id) if call_id else None
            translated.append(
                _Message("tool", text, tool_name=name or message.name, tool_call_id=call_id)
            )
        else:
            translated.append(_Message("user", text, images=images or None))
    return translated


def _ollama_tools(request: ChatRequest) -> list[_Tool] | None:
    tools = request.tools
    choice = request.tool_choice
    if not tools or choice == "none":
        return None
    if isinstance(choice, NamedToolChoice):
        # Ollama cannot force a call; offering only the named tool is the nearest it comes.
        tools = [tool for tool in tools if tool.function.name == choice.function.name]
    functions = [tool.function for tool in tools]
    return [_Tool(_ToolFunction(f.name, f.description, f.parameters)) for f in functions] or None


def _ollama_format(response_format: ResponseFormat | None) -> str | dict[str, Any] | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_schema":
        # OpenAI wraps the schema: {"name": ..., "schema": {...}, "strict": ...}.
        schema = (response_format.json_schema or {}).get("schema")
        if isinstance(schema, dict):
            return schema
    return "json"


def _ollama_options(request: ChatRequest, upstream: Upstream) -> _Options:
    # The deployment's cap applies even when the client sets none: the gateway reserves
    # budget for at most that many tokens, and small local models can ramble on for ever.
    cap = upstream.max_output_tokens
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    return _Options(
        num_predict=min(request.output_limit or cap, cap),
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        stop=stop or None,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
    )


def chat_body(call: ChatCall, upstream: Upstream, *, stream: bool) -> bytes:
    """The `/api/chat` request body for `call`."""
    request = call.request
    body = _ChatRequest(
        model=upstream.model,
        messages=_ollama_messages(request.messages),
        stream=stream,
        options=_ollama_options(request, upstream),
        tools=_ollama_tools(request),
        format=_ollama_format(request.response_format),
    )
    return msgspec.json.encode(body)


# --- Ollama answer -> OpenAI answer -------------------------------------------------------


def _arguments_text(arguments: Raw) -> str:
    raw = bytes(arguments)
    if raw.startswith(b'"'):
        # Not what Ollama sends, but some look-alike servers send OpenAI's JSON string.
        return msgspec.json.decode(raw, type=str)
    return raw.decode()


def _openai_tool_calls(
    calls: list[_ToolCall] | None, request_id: str, first: int, *, streamed: bool
) -> list[ToolCall]:
    """OpenAI's tool calls, numbered from `first`; stream deltas also carry their index."""
    translated = []
    for number, call in enumerate(calls or (), start=first):
        translated.append(
            ToolCall(
                FunctionCall(call.function.name, _arguments_text(call.function.arguments)),
                id=call.id or f"call_{request_id}_{number}",
                index=number if streamed else None,
            )
        )
    return translated


def _fragment(call: ToolCall) -> ToolCallFragment:
    """A whole streamed call (numbered by `_openai_tool_calls`) as one fragment."""
    return ToolCallFragment(call.index or 0, call.id, call.function.name, call.function.arguments)


def _finish_reason(done_reason: str | None, called_tools: bool) -> str:
    # Ollama also says `load` and `unload`, which only answers without messages give.
    if called_tools:
        return "tool_calls"
    return "length" if done_reason == "length" else "stop"


def _failed(upstream: Upstream, message: str) -> UpstreamError:
    # An error reported in a 200 answer is the provider's trouble, like a 5xx: retryable, so
    # that a stream failing before its first byte can still fall back.
    return UpstreamError(502, f"{upstream.provider} upstream failed: {message}", retryable=True)


class OllamaAdapter:
    """Speaks Ollama's native `/api/chat` and `/api/embed` at `base_url`."""

    def __init__(self, upstream: Upstream, client: UpstreamClient) -> None:
        self.upstream = upstream
        self.client = client

    async def _post(self, path: str, body: bytes, *, stream: bool = False) -> UpstreamResponse:
        url = join_url(self.upstream.base_url or DEFAULT_BASE_URL, path)
        # Ollama itself has no keys; one is for a proxy in front of it, or for ollama.com.
        key = self.upstream.api_key
        headers = {"authorization": f"Bearer {key}"} if key else {}
        request = build_request(self.upstream, url, body, headers)
        return await send(
            self.client, self.upstream, request, stream=stream, parse_error=ollama_error_message
        )

    async def chat(self, call: ChatCall) -> ChatResult:
        response = await self._post("api/chat", chat_body(call, self.upstream, stream=False))
        answer = decode_json(_chat_decoder, response.content, self.upstream)
        if answer.error is not None:
            raise _failed(self.upstream, answer.error)
        message = answer.message or _Message("assistant")
        calls = _openai_tool_calls(message.tool_calls, call.request_id, 0, streamed=False)
        usage, estimated = usage_or_estimate(
            token_count(answer.prompt_eval_count),
            token_count(answer.eval_count),
            call,
            completion_text(message.content, calls),
        )
        reply = ResponseMessage(
            # OpenAI's answers that call tools and say nothing have `content: null`.
            content=message.content or (None if calls else ""),
            tool_calls=calls or None,
        )
        completion = ChatCompletion(
            id=call.request_id,
            model=self.upstream.model,
            choices=[Choice(0, reply, _finish_reason(answer.done_reason, bool(calls)))],
            usage=usage,
        )
        return ChatResult(completion=completion, usage=usage, usage_estimated=estimated)

    async def open_stream(self, call: ChatCall) -> OllamaStream:
        body = chat_body(call, self.upstream, stream=True)
        response = await self._post("api/chat", body, stream=True)
        return OllamaStream(call, self.upstream, response)

    async def complete(self, call: CompletionCall) -> WireResult:
        raise does_not_serve(self.upstream.provider, "legacy text completions")

    async def images(self, call: ImageCall) -> WireResult:
        raise does_not_serve(self.upstream.provider, "image generations")

    async def embed(self, call: EmbedCall) -> EmbedResult:
        request = call.request
        texts = request.texts()
        body = _EmbedRequest(
            model=self.upstream.model,
            input=request.input if isinstance(request.input, str) else texts,
            dimensions=request.dimensions,
        )
        response = await self._post("api/embed", msgspec.json.encode(body))
        answer = decode_json(_embed_decoder, response.content, self.upstream)
        if len(answer.embeddings) != len(texts):
            raise _failed(
                self.upstream, f"{len(answer.embeddings)} embeddings for {len(texts)} inputs"
            )
        data = [
            Embedding(index, encode_embedding(vector, request.encoding_format))
            for index, vector in enumerate(answer.embeddings)
        ]
        tokens = token_count(answer.prompt_eval_count)
        estimated = tokens is None
        if tokens is None:
            tokens = sum(estimate_text_tokens(text) for text in texts)
        result = EmbeddingList(data, self.upstream.model, EmbeddingUsage(tokens, tokens))
        usage = Usage(tokens, 0, tokens)
        return EmbedResult(embeddings=result, usage=usage, usage_estimated=estimated)


class OllamaStream(CountedStream):
    """Ollama's NDJSON lines, translated into neutral stream events.

    Nothing is yielded before Ollama's first line has arrived and proved not to be an error,
    so that a failure at the start can still fall back to another deployment.
    """

    def __init__(self, call: ChatCall, upstream: Upstream, response: UpstreamResponse) -> None:
        super().__init__(call, upstream, response)

    async def _events(self) -> AsyncIterator[Event]:
        request_id = self._call.request_id
        calls_so_far = 0
        started = False
        async for line in iter_ndjson(self._response, self._upstream):
            chunk = decode_json(_chat_decoder, line, self._upstream)
            if chunk.error is not None:
                raise _failed(self._upstream, chunk.error)
            if not started:
                started = True
                yield Start(request_id, self._upstream.model, self._created)
            message = chunk.message
            if message is not None and message.content:
                self._written.append(message.content)
                yield TextDelta(message.content)
            if message is not None and message.tool_calls:
                # Ollama sends each call whole, so one delta carries its name and arguments.
                calls = _openai_tool_calls(
                    message.tool_calls, request_id, calls_so_far, streamed=True
                )
                calls_so_far += len(calls)
                self._written.append(completion_text("", calls))
                yield ToolCallDelta([_fragment(call) for call in calls])
            if chunk.done:
                self._response.complete()
                yield self._finish(chunk, called_tools=calls_so_far > 0)
                if self._call.request.include_usage:
                    yield UsageReport(self.usage)
                return
        # No `done` line: the answer was cut off, not complete.
        raise UpstreamError(
            502, f"{self._upstream.provider} upstream stream ended early", retryable=True
        )

    def _finish(self, last: _ChatResponse, *, called_tools: bool) -> Finish:
        self.usage, self.usage_estimated = usage_or_estimate(
            token_count(last.prompt_eval_count),
            token_count(last.eval_count),
            self._call,
            "".join(self._written),
        )
        return Finish(_finish_reason(last.done_reason, called_tools))

    async def aclose(self) -> None:
        await self._response.aclose()
