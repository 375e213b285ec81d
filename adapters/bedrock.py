"""AWS Bedrock's Converse API: `POST /model/{modelId}/converse`, and `/converse-stream`, whose
answer is AWS's binary event stream (`application/vnd.amazon.eventstream`).

Requests are translated from OpenAI's format and answers back into it. What differs:

- The model is in the path (percent-encoded: model ids hold `:`, inference-profile ARNs `/`),
  and every request is signed with SigV4 (`adapters.bedrock_auth`); the endpoint is
  `https://bedrock-runtime.{region}.amazonaws.com` unless the deployment's `base_url` says
  otherwise (a VPC endpoint, a test's mock).
- System (and `developer`) messages become the top-level `system` blocks; the rest alternate
  user/assistant, so consecutive messages of one role are merged into one.
- Content is a list of blocks, each an object with one member: `text`, `image` (the image's
  bytes, base64, and its format: Bedrock fetches no URLs, so only data URLs are taken),
  `toolUse` (the arguments as a JSON object) and `toolResult` (inside a user message).
- `inferenceConfig` holds `maxTokens` (always sent: the deployment's cap bounds what the
  gateway reserved), `temperature` (clamped to 1, the top of most Bedrock models' range),
  `topP` and `stopSequences`.
- Tools are `toolConfig.tools[].toolSpec` with the schema under `inputSchema.json`;
  `tool_choice` is `auto`, `any` (`required`) or `tool` (named). Bedrock has no "none": the
  tools are left out then, unless earlier turns used them (Bedrock refuses tool blocks without
  a `toolConfig`), when they stay offered without a choice.
- Stop reasons: `end_turn` and `stop_sequence` are `stop`, `max_tokens` and
  `model_context_window_exceeded` are `length`, `tool_use` is `tool_calls`,
  `guardrail_intervened` and `content_filtered` are `content_filter`.
- Usage is `inputTokens`/`outputTokens`; prompt-cache reads and writes are counted apart by
  AWS and added to the prompt tokens here, since they are input too.
- A stream's frames are parsed by botocore's own `EventStreamBuffer` (prelude, headers, CRCs);
  each frame's `:event-type` header names the event (`messageStart`, `contentBlockStart`,
  `contentBlockDelta`, `contentBlockStop`, `messageStop`, `metadata`) and its payload is JSON.
  An `exception` frame (`modelStreamErrorException`, `throttlingException`, …) fails the
  stream as the same error would fail a request.
- AWS names its exception in the `x-amzn-ErrorType` header (a frame's `:exception-type` in a
  stream), not in the `{"message": …}` body; each is classed for the router's retry and
  fallback rules by that name (`_EXCEPTIONS`), else by its status.

Fields Bedrock's Converse has no equivalent for (`n`, `seed`, the penalties, `user`,
`response_format`, `parallel_tool_calls`) are dropped. Converse serves no embeddings.
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import quote, unquote_to_bytes

import msgspec
from botocore.eventstream import EventStreamBuffer, EventStreamMessage, ParserError
from msgspec import Raw
from yarl import URL

from adapters import bedrock_wire as wire
from adapters.anthropic import max_tokens_for
from adapters.bedrock_auth import AwsAuth
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
    TRANSPORT_ERRORS,
    UpstreamClient,
    UpstreamRequest,
    UpstreamResponse,
    decode_json,
    send,
    timeout_for,
    too_large,
    transport_error,
)
from adapters.streams import CountedStream
from adapters.tokens import (
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
    ResponseMessage,
    ToolCall,
    Upstream,
    UpstreamError,
    WireResult,
    does_not_serve,
)

_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
_arguments_decoder = msgspec.json.Decoder(dict[str, Any])
# What Converse calls each image format, by media type.
_IMAGE_FORMATS = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/gif": "gif",
    "image/webp": "webp",
}

# --- OpenAI request -> Converse request -----------------------------------------------------


def _bad_request(message: str) -> UpstreamError:
    return UpstreamError(400, message, type="invalid_request_error")


def _image(url: str) -> wire.ImageBlock:
    if not url.startswith("data:"):
        raise _bad_request("a Bedrock model takes images inline only: send a data: URL")
    header, comma, data = url.partition(",")
    if not comma:
        raise _bad_request("malformed data: URL in image_url")
    media_type = header[len("data:") :].split(";", 1)[0].lower()
    image_format = _IMAGE_FORMATS.get(media_type)
    if image_format is None:
        raise _bad_request(f"a Bedrock model takes png, jpeg, gif or webp, not {media_type!r}")
    if not header.endswith(";base64"):
        data = base64.b64encode(unquote_to_bytes(data)).decode()
    return wire.ImageBlock(image_format, wire.ImageSource(data))


def _content_blocks(content: str | list[ContentPart] | None) -> list[wire.ContentBlock]:
    if content is None:
        return []
    if isinstance(content, str):
        # Bedrock refuses blank text blocks, and an empty message says nothing anyway.
        return [wire.ContentBlock(text=content)] if content else []
    blocks: list[wire.ContentBlock] = []
    for part in content:
        if part.type == "text":
            if part.text:
                blocks.append(wire.ContentBlock(text=part.text))
        elif part.type == "image_url" and part.image_url is not None:
            blocks.append(wire.ContentBlock(image=_image(part.image_url.url)))
        else:
            raise _bad_request(f"a Bedrock model cannot take {part.type!r} content")
    return blocks


def _plain_text(content: str | list[ContentPart] | None, what: str) -> str:
    """The text of a message that Converse takes as text only (system prompt, tool result)."""
    if not isinstance(content, list):
        return content or ""
    if any(part.type != "text" for part in content):
        raise _bad_request(f"a Bedrock {what} can hold text only")
    return "\n".join(part.text or "" for part in content)


def _tool_use(call: ToolCall) -> wire.ContentBlock:
    text = call.function.arguments or "{}"
    try:
        _arguments_decoder.decode(text)
    except msgspec.DecodeError as exc:
        raise _bad_request(
            f"tool call {call.id or call.function.name!r}: arguments must be a JSON object"
        ) from exc
    if not call.id or not call.function.name:
        # Converse pairs every result with its call by id: a call without one is unusable.
        raise _bad_request("every assistant tool call needs an id and a function name")
    return wire.ContentBlock(
        tool_use=wire.ToolUseBlock(call.id, call.function.name, Raw(text.encode()))
    )


def _tool_result(message: Message) -> wire.ContentBlock:
    if not message.tool_call_id:
        raise _bad_request("a tool message needs the tool_call_id of the call it answers")
    text = _plain_text(message.content, "tool result")
    content = [wire.ToolResultContent(text)] if text else []
    return wire.ContentBlock(tool_result=wire.ToolResultBlock(message.tool_call_id, content))


def _role_and_blocks(message: Message) -> tuple[str, list[wire.ContentBlock]]:
    if message.role == "assistant":
        blocks = _content_blocks(message.content)
        return "assistant", blocks + [_tool_use(call) for call in message.tool_calls or ()]
    if message.role in ("tool", "function"):
        # Tool results are what the user side tells the model, in Converse's view.
        return "user", [_tool_result(message)]
    return "user", _content_blocks(message.content)


def converse_messages(
    messages: list[Message],
) -> tuple[list[wire.SystemBlock] | None, list[wire.Message]]:
    """The `system` blocks and the alternating user/assistant messages for `messages`."""
    system: list[wire.SystemBlock] = []
    translated: list[wire.Message] = []
    for message in messages:
        if message.role in ("system", "developer"):
            text = _plain_text(message.content, "system prompt")
            if text:
                system.append(wire.SystemBlock(text))
            continue
        role, blocks = _role_and_blocks(message)
        if not blocks:
            continue
        if translated and translated[-1].role == role:
            # Several tool results in a row (or a result then the user's words) are one turn.
            translated[-1].content.extend(blocks)
        else:
            translated.append(wire.Message(role, blocks))
    return system or None, translated


def _uses_tools(messages: list[wire.Message]) -> bool:
    return any(
        block.tool_use is not None or block.tool_result is not None
        for message in messages
        for block in message.content
    )


def _tool_config(request: ChatRequest, messages: list[wire.Message]) -> wire.ToolConfig | None:
    if not request.tools:
        return None
    choice = request.tool_choice
    if choice == "none" and not _uses_tools(messages):
        return None
    tools = [
        wire.ToolEntry(
            wire.ToolSpec(
                tool.function.name,
                wire.InputSchema(tool.function.parameters or _NO_PARAMETERS),
                tool.function.description or None,
            )
        )
        for tool in request.tools
    ]
    if isinstance(choice, NamedToolChoice):
        return wire.ToolConfig(tools, wire.ToolChoice(tool=wire.SpecificTool(choice.function.name)))
    if choice == "required":
        return wire.ToolConfig(tools, wire.ToolChoice(any=wire.Empty()))
    if choice == "auto":
        return wire.ToolConfig(tools, wire.ToolChoice(auto=wire.Empty()))
    return wire.ToolConfig(tools)


def converse_body(call: ChatCall, upstream: Upstream) -> bytes:
    """The Converse (and ConverseStream) request body for `call`."""
    request = call.request
    system, messages = converse_messages(request.messages)
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    temperature = request.temperature
    if temperature is not None:
        # OpenAI's range is 0-2, most Bedrock models' 0-1: above 1 asks for the most random.
        temperature = min(temperature, 1.0)
    body = wire.ConverseRequest(
        messages=messages,
        inference_config=wire.InferenceConfig(
            max_tokens=max_tokens_for(request, upstream),
            temperature=temperature,
            top_p=request.top_p,
            stop_sequences=stop or None,
        ),
        system=system,
        tool_config=_tool_config(request, messages),
    )
    return wire.request_encoder.encode(body)


# --- Converse answer -> OpenAI answer -------------------------------------------------------

_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}


def finish_reason(stop_reason: str | None, called_tools: bool) -> str:
    reason = _FINISH_REASONS.get(stop_reason or "", "stop")
    # OpenAI's clients look for `tool_calls` to know they have calls to run.
    return "tool_calls" if called_tools and reason == "stop" else reason


def _prompt_tokens(usage: wire.TokenUsage) -> int | None:
    counted = token_count(usage.input_tokens)
    if counted is None:
        return None
    cached = (token_count(usage.cache_read_input_tokens) or 0) + (
        token_count(usage.cache_write_input_tokens) or 0
    )
    return counted + cached


def _output_tokens(usage: wire.TokenUsage) -> int | None:
    return token_count(usage.output_tokens)


def chat_result(answer: wire.ConverseResponse, call: ChatCall, upstream: Upstream) -> ChatResult:
    """A Converse answer as the gateway's typed result."""
    blocks = answer.output.message.content if answer.output.message else []
    text = "".join(block.text for block in blocks if block.text is not None)
    uses = [block.tool_use for block in blocks if block.tool_use is not None]
    calls = [
        ToolCall(
            FunctionCall(use.name, bytes(use.input).decode()),
            id=use.tool_use_id or f"call_{call.request_id}_{number}",
        )
        for number, use in enumerate(uses)
    ]
    usage = answer.usage or wire.TokenUsage()
    counted, estimated = usage_or_estimate(
        _prompt_tokens(usage), _output_tokens(usage), call, completion_text(text, calls)
    )
    # OpenAI's answers that call tools and say nothing have `content: null`.
    reply = ResponseMessage(content=text or (None if calls else ""), tool_calls=calls or None)
    completion = ChatCompletion(
        id=call.request_id,
        model=upstream.model,
        choices=[Choice(0, reply, finish_reason(answer.stop_reason, bool(calls)))],
        usage=counted,
    )
    return ChatResult(completion=completion, usage=counted, usage_estimated=estimated)


# --- errors ---------------------------------------------------------------------------------

# AWS's exceptions by name (`x-amzn-ErrorType` on an answer, `:exception-type` on a stream's
# frame): the status the client sees, whether the router retries, and OpenAI's code where it
# has one (else AWS's name). Throttling is retried with backoff; a quota spent is not, but the
# router falls back from it (a 429); the model's own trouble is retried or fallen back from;
# a request Bedrock finds invalid is the client's (400, never retried); AWS's other refusals
# (access denied, bad signatures, expired tokens) are the node's setup: a 502, by status.
_EXCEPTIONS: dict[str, tuple[int, bool, str | None]] = {
    "ThrottlingException": (429, True, "rate_limit_exceeded"),
    "ModelNotReadyException": (429, True, "rate_limit_exceeded"),
    "ServiceQuotaExceededException": (429, False, "insufficient_quota"),
    "ValidationException": (400, False, None),
    "ResourceNotFoundException": (404, False, "model_not_found"),
    "ModelTimeoutException": (504, True, None),
    "ModelErrorException": (502, True, None),
    "ModelStreamErrorException": (502, True, None),
    "InternalServerException": (502, True, None),
    "ServiceUnavailableException": (502, True, None),
}
_EXCEPTION_NAME = re.compile(r"[A-Za-z]{1,64}")
_TOO_LONG = ("too long", "too many tokens", "context length", "context window")


def bedrock_error_message(body: bytes) -> tuple[str, str | None]:
    """The message of AWS's `{"message": …}` error body, or the body's text."""
    try:
        parsed = wire.error_decoder.decode(body)
    except msgspec.DecodeError:
        parsed = wire.ErrorBody()
    text = parsed.message or parsed.Message
    if not text:
        return body[:500].decode(errors="replace").strip(), None
    return text[:2000], None


def exception_name(value: object) -> str | None:
    """AWS's exception name from an untrusted header (`ThrottlingException:http://…`, or a
    stream's `throttlingException`), capitalised; None if it is not a name."""
    if not isinstance(value, str):
        return None
    name = value.split(":", 1)[0].strip()
    if not _EXCEPTION_NAME.fullmatch(name):
        return None
    return name[0].upper() + name[1:]


def classify(error: UpstreamError, name: str | None) -> UpstreamError:
    """`error` (classed by its HTTP status) in the node's terms for AWS's exception `name`."""
    known = _EXCEPTIONS.get(name or "")
    if known is not None:
        error.status, error.retryable, error.code = known
        error.code = error.code or name
        error.type = "invalid_request_error" if error.status in (400, 404) else "upstream_error"
    elif name:
        error.code = name
    if error.status == 400 and any(words in error.message.lower() for words in _TOO_LONG):
        error.code = "context_length_exceeded"
    return error


def _refine(error: UpstreamError, headers: Mapping[str, str]) -> UpstreamError:
    return classify(error, exception_name(headers.get("x-amzn-errortype")))


def _stream_exception(upstream: Upstream, message: EventStreamMessage) -> UpstreamError:
    """An `exception` frame (or an event-stream `error` frame): failed as the same error would
    fail the request."""
    headers = message.headers
    name = exception_name(headers.get(":exception-type") or headers.get(":error-code"))
    try:
        text = wire.payload_decoder.decode(message.payload).message or ""
    except msgspec.DecodeError:
        text = str(headers.get(":error-message") or "")[:2000]
    error = UpstreamError(
        502,
        f"{upstream.provider} upstream failed mid-stream ({name or 'unnamed'}): "
        f"{text[:2000] or 'no message'}",
        retryable=True,
    )
    return classify(error, name)


# --- the adapter ----------------------------------------------------------------------------


class BedrockAdapter:
    """Speaks Bedrock's Converse API in the deployment's region, signed with SigV4."""

    def __init__(self, upstream: Upstream, client: UpstreamClient) -> None:
        self.upstream = upstream
        self.client = client
        self.auth = AwsAuth(upstream.region, upstream.profile, upstream.api_key)

    async def url(self, action: str) -> str:
        """The URL of `action` (`converse`, `converse-stream`) for this deployment's model,
        the model id percent-encoded as AWS signs it."""
        if self.upstream.base_url:
            base = self.upstream.base_url.rstrip("/")
        else:
            base = f"https://bedrock-runtime.{await self.auth.region()}.amazonaws.com"
        return f"{base}/model/{quote(self.upstream.model, safe='')}/{action}"

    async def _post(self, call: ChatCall, *, stream: bool) -> UpstreamResponse:
        url = await self.url("converse-stream" if stream else "converse")
        body = converse_body(call, self.upstream)
        accept = "application/vnd.amazon.eventstream" if stream else "application/json"
        headers = {"content-type": "application/json", "accept": accept, **self.upstream.headers}
        signed = await self.auth.headers(url, body, headers)
        # `encoded=True`: the path goes out exactly as signed (yarl would decode `%3A`).
        request = UpstreamRequest(URL(url, encoded=True), body, signed, timeout_for(self.upstream))
        return await send(
            self.client,
            self.upstream,
            request,
            stream=stream,
            parse_error=bedrock_error_message,
            refine_error=_refine,
        )

    async def chat(self, call: ChatCall) -> ChatResult:
        response = await self._post(call, stream=False)
        answer = decode_json(wire.response_decoder, response.content, self.upstream)
        return chat_result(answer, call, self.upstream)

    async def open_stream(self, call: ChatCall) -> BedrockStream:
        response = await self._post(call, stream=True)
        return BedrockStream(call, self.upstream, response)

    async def complete(self, call: CompletionCall) -> WireResult:
        raise does_not_serve(self.upstream.provider, "legacy text completions")

    async def images(self, call: ImageCall) -> WireResult:
        raise does_not_serve(self.upstream.provider, "image generations")

    async def embed(self, call: EmbedCall) -> EmbedResult:
        raise does_not_serve(self.upstream.provider, "embeddings")


async def iter_frames(
    response: UpstreamResponse, upstream: Upstream
) -> AsyncIterator[EventStreamMessage]:
    """The event stream's frames, parsed by botocore; a frame larger than the node's
    `max_event_bytes` (or one still unfinished past it) is refused, and so is a frame whose
    CRCs or lengths are wrong."""
    frames = EventStreamBuffer()
    limit = upstream.max_event_bytes
    pending = 0  # bytes given to the parser and not yet returned as a frame
    try:
        async for chunk in response.aiter_bytes():
            frames.add_data(chunk)
            pending += len(chunk)
            for frame in frames:
                pending -= frame.prelude.total_length
                yield frame
            if pending > limit:
                raise too_large(upstream, "a stream event", limit)
    except TRANSPORT_ERRORS as exc:
        raise transport_error(upstream, exc) from exc
    except ParserError as exc:
        raise UpstreamError(
            502, f"{upstream.provider} upstream sent a broken event-stream frame: {exc}"
        ) from exc
    if pending:
        raise UpstreamError(
            502, f"{upstream.provider} upstream stream ended inside a frame", retryable=True
        )


class BedrockStream(CountedStream):
    """ConverseStream's events, translated into neutral stream events.

    The `Start` event waits for the first content, not for `messageStart`: Bedrock reports a
    throttled or failed model as an exception frame, and as long as nothing has been yielded
    the router can still retry or fall back to another deployment.
    """

    def __init__(self, call: ChatCall, upstream: Upstream, response: UpstreamResponse) -> None:
        super().__init__(call, upstream, response)
        self._stop_reason: str | None = None
        self._stopped = False
        self._started = False
        # Bedrock numbers all content blocks; OpenAI numbers tool calls only.
        self._tool_index: dict[int, int] = {}
        self._tool_has_arguments: dict[int, bool] = {}

    async def _events(self) -> AsyncIterator[Event]:
        async for frame in iter_frames(self._response, self._upstream):
            kind = frame.headers.get(":message-type", "event")
            if kind in ("exception", "error"):
                raise _stream_exception(self._upstream, frame)
            name = frame.headers.get(":event-type")
            if name == "metadata":
                self._note_usage(self._payload(frame).usage)
                if self._stopped:
                    for step in self._finish():
                        yield step
                    return
            elif name == "messageStop":
                self._stop_reason = self._payload(frame).stop_reason
                self._stopped = True
            elif name in ("contentBlockStart", "contentBlockDelta", "contentBlockStop"):
                for step in self._block_event(name, self._payload(frame)):
                    yield step
            # `messageStart` says only the role; event types added after this adapter was
            # written are skipped.
        if not self._stopped:
            raise UpstreamError(
                502, f"{self._upstream.provider} upstream stream ended early", retryable=True
            )
        # `messageStop` came but no `metadata`: the answer is whole, its usage estimated.
        for step in self._finish():
            yield step

    def _payload(self, frame: EventStreamMessage) -> wire.StreamPayload:
        return decode_json(wire.payload_decoder, frame.payload, self._upstream)

    def _note_usage(self, usage: wire.TokenUsage | None) -> None:
        if usage is not None:
            self._prompt_count = _prompt_tokens(usage)
            self._completion_count = _output_tokens(usage)

    def _start(self) -> list[Event]:
        if self._started:
            return []
        self._started = True
        return [Start(self._call.request_id, self._upstream.model, self._created)]

    def _block_event(self, name: str, payload: wire.StreamPayload) -> list[Event]:
        block = payload.content_block_index
        if name == "contentBlockStart":
            start = payload.start.tool_use if payload.start else None
            if start is None or block in self._tool_index:
                return []
            index = self._tool_index[block] = len(self._tool_index)
            self._tool_has_arguments[block] = False
            self._written.append(start.name)
            call_id = start.tool_use_id or f"call_{self._call.request_id}_{index}"
            fragment = ToolCallFragment(index, call_id, start.name, "")
            return [*self._start(), ToolCallDelta([fragment])]
        if name == "contentBlockStop":
            if block in self._tool_index and not self._tool_has_arguments[block]:
                # A call without arguments: OpenAI's clients expect `{}`, not nothing.
                self._tool_has_arguments[block] = True
                return [ToolCallDelta([ToolCallFragment(self._tool_index[block], arguments="{}")])]
            return []
        delta = payload.delta
        if delta is None:
            return []
        if delta.text:
            self._written.append(delta.text)
            return [*self._start(), TextDelta(delta.text)]
        if delta.tool_use is not None and delta.tool_use.input and block in self._tool_index:
            self._tool_has_arguments[block] = True
            self._written.append(delta.tool_use.input)
            fragment = ToolCallFragment(self._tool_index[block], arguments=delta.tool_use.input)
            return [*self._start(), ToolCallDelta([fragment])]
        # Reasoning and citation deltas have no place in OpenAI's chat format.
        return []

    def _finish(self) -> list[Event]:
        written = "".join(self._written)
        self.usage, self.usage_estimated = usage_or_estimate(
            self._prompt_count, self._completion_count, self._call, written
        )
        reason = finish_reason(self._stop_reason, bool(self._tool_index))
        events = [*self._start(), Finish(reason)]
        if self._call.request.include_usage:
            events.append(UsageReport(self.usage))
        return events

    async def aclose(self) -> None:
        await self._response.aclose()
