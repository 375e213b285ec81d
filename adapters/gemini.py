"""Google's Gemini API (`generativelanguage`): `models/{model}:generateContent`,
`:streamGenerateContent?alt=sse`, `:embedContent` and `:batchEmbedContents`.

Requests are translated from OpenAI's format and answers back into it (the wire types are in
`adapters.gemini_wire`); Vertex AI takes the same body on its own URL (`adapters.vertex`).
What differs from OpenAI:

- The key travels as `x-goog-api-key`. The API version is a path segment (`v1beta` unless the
  deployment's `api_version` says otherwise).
- Messages are `contents` with roles `user` and `model`, each a list of `parts`; system (and
  `developer`) messages become `systemInstruction`. Consecutive contents of one role are
  merged, so that the answers to parallel calls travel together as Gemini wants them.
- An assistant's tool calls are `functionCall` parts whose `args` is a JSON object; a tool's
  result is a `functionResponse` part, paired with its call by the function's name (found from
  the `tool_call_id`), whose `response` is the result's JSON object, or `{"output": text}`.
- A thinking model signs its function calls (`thoughtSignature`) and refuses a later turn
  whose calls come back unsigned: the signature is carried inside the tool call's id
  (`…__ts__<base64url>`), which OpenAI's clients send back untouched.
- Images, audio and files go inline (`inlineData`) from `data:` URLs; an http(s) or `gs://`
  URL is passed as `fileData` for Google to fetch (the gateway never fetches what clients
  name), its MIME type guessed from its name.
- `generationConfig` holds the sampling fields, the output cap (`maxOutputTokens`, always
  sent, bounded by the deployment's), `stopSequences`, `candidateCount` (`n`) and JSON output
  (`responseMimeType`, with `responseJsonSchema` for a `json_schema`). Tools are
  `functionDeclarations` with their JSON Schema; `tool_choice` is `toolConfig`'s mode
  (`AUTO`, `ANY`, `NONE`, `ANY` limited to one name).
- A prompt Google blocks (`promptFeedback.blockReason`) is the client's 400
  (`content_policy_violation`), never retried; an answer stopped for safety, recitation or a
  blocklist ends with `content_filter`.
- Usage is `usageMetadata`: the prompt's count (which includes cached tokens) plus tokens
  tools added; the candidates' count plus a thinking model's thoughts.
- A stream is a sequence of whole answers-so-far, one per SSE event, with no closing event: it
  is complete when every candidate has a finish reason.
- Errors are Google's `{"error": {"code", "message", "status", "details"}}`: a 429's
  `RetryInfo.retryDelay` is honoured as a Retry-After; a bad key (`API_KEY_INVALID`) and a
  `FAILED_PRECONDITION` (billing, region) are the deployment's fault, not the client's.

Fields Gemini has no place for (`user`, `parallel_tool_calls`, logprobs, …) are dropped.
"""

from __future__ import annotations

import base64
import binascii
import mimetypes
import re
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

import msgspec
from msgspec import Raw

from adapters.anthropic import max_tokens_for
from adapters.events import (
    Event,
    Finish,
    Start,
    TextDelta,
    ToolCallDelta,
    ToolCallFragment,
    UsageReport,
)
from adapters.gemini_wire import (
    BatchEmbedContentsRequest,
    BatchEmbedContentsResponse,
    Blob,
    Candidate,
    Content,
    EmbedContentRequest,
    EmbedContentResponse,
    ErrorBody,
    ErrorStatus,
    FileRef,
    FunctionCall,
    FunctionCallingConfig,
    FunctionDeclaration,
    FunctionResponse,
    GenerateContentRequest,
    GenerateContentResponse,
    GenerationConfig,
    Part,
    PromptFeedback,
    Tool,
    ToolConfig,
    UsageMetadata,
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
from adapters.tokens import (
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
    ImageCall,
    Message,
    NamedToolChoice,
    ResponseMessage,
    ToolCall,
    Upstream,
    UpstreamError,
    Usage,
    WireResult,
    does_not_serve,
    encode_embedding,
    error_status_for,
    sane_wait,
)
from adapters.types import FunctionCall as OpenAIFunctionCall

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
DEFAULT_API_VERSION = "v1beta"
# What `batchEmbedContents` takes in one call; more inputs are sent in several.
EMBED_BATCH = 100

_response_decoder = msgspec.json.Decoder(GenerateContentResponse)
_error_decoder = msgspec.json.Decoder(ErrorBody)
_embed_decoder = msgspec.json.Decoder(EmbedContentResponse)
_batch_decoder = msgspec.json.Decoder(BatchEmbedContentsResponse)
_object_decoder = msgspec.json.Decoder(dict[str, Any])

# --- errors -----------------------------------------------------------------------------------

# The HTTP status Google gives each canonical code, for an error that arrives inside a stream
# (which has already answered 200) with only its `status`.
_STATUS_OF_CODE = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNKNOWN": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
# Reasons (ErrorInfo) and codes that say the deployment's key, billing or region is wrong:
# Google answers them 400, but no client can fix them, and another deployment may serve.
_DEPLOYMENT_REASONS = frozenset({"API_KEY_INVALID", "API_KEY_SERVICE_BLOCKED", "SERVICE_DISABLED"})
_DEPLOYMENT_CODES = frozenset({"FAILED_PRECONDITION", "UNAUTHENTICATED", "PERMISSION_DENIED"})
# `The input token count (1234567) exceeds the maximum number of tokens allowed (1048576).`
_TOO_LONG = re.compile(r"input token count.*exceeds the maximum", re.IGNORECASE)
# A protobuf Duration in JSON: `37s`, `1.5s`.
_DURATION = re.compile(r"(\d{1,9}(?:\.\d{1,9})?)s")


def google_error(body: bytes) -> ErrorStatus | None:
    """Google's error (`{"error": {...}}`) in `body`, or None if the body is not one."""
    try:
        status = _error_decoder.decode(body).error
    except (msgspec.DecodeError, RecursionError):
        return None
    if status is None or not (status.status or status.code):
        return None
    return status


def retry_delay(status: ErrorStatus) -> float | None:
    """The wait a `RetryInfo` detail asks for, in seconds (untrusted: bounded)."""
    for detail in status.details:
        if detail.type.endswith("google.rpc.RetryInfo") and detail.retry_delay:
            text = detail.retry_delay.strip()
            if len(text) <= 24 and _DURATION.fullmatch(text):
                return sane_wait(float(text[:-1]))
    return None


def _openai_code(status: ErrorStatus) -> str | None:
    """OpenAI's code for the same failure where it has one, else Google's own, lower-cased."""
    if status.status == "RESOURCE_EXHAUSTED":
        return "rate_limit_exceeded"
    if status.status == "NOT_FOUND" and "model" in status.message.lower():
        return "model_not_found"
    if _TOO_LONG.search(status.message):
        return "context_length_exceeded"
    reason = next((d.reason for d in status.details if d.reason), None)
    return (reason or status.status).lower() or None


def _deployment_fault(status: ErrorStatus) -> bool:
    reasons = {detail.reason for detail in status.details}
    return bool(reasons & _DEPLOYMENT_REASONS) or status.status in _DEPLOYMENT_CODES


def google_failure(upstream: Upstream, http_status: int, status: ErrorStatus) -> UpstreamError:
    """Google's error (an answer's or a stream event's) as the gateway's error."""
    client_status, retryable = error_status_for(http_status)
    if _deployment_fault(status) and client_status < 500:
        client_status, retryable = 502, False
    where = f"{upstream.provider} upstream answered {http_status}"
    detail = status.message or status.status
    return UpstreamError(
        client_status,
        f"{where}: {detail}" if detail else where,
        type="invalid_request_error" if client_status in (400, 404, 413, 422) else "upstream_error",
        code=_openai_code(status),
        retryable=retryable,
        retry_after=retry_delay(status),
        upstream_status=http_status,
    )


class ErrorReader:
    """`send`'s error parser that keeps Google's decoded error, so that the adapter can then
    read what a message and a code cannot carry (RetryInfo, ErrorInfo)."""

    def __init__(self) -> None:
        self.status: ErrorStatus | None = None

    def __call__(self, body: bytes) -> tuple[str, str | None]:
        self.status = google_error(body)
        if self.status is None or not self.status.message:
            return body[:500].decode(errors="replace").strip(), None
        return self.status.message, _openai_code(self.status)

    def refine(self, upstream: Upstream, error: UpstreamError) -> UpstreamError:
        if self.status is None or error.upstream_status is None:
            return error
        refined = google_failure(upstream, error.upstream_status, self.status)
        if refined.retry_after is None:
            refined.retry_after = error.retry_after  # a Retry-After header, if Google sent one
        return refined


async def send_to_google(
    client: UpstreamClient,
    upstream: Upstream,
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    stream: bool = False,
    reader: ErrorReader | None = None,
) -> UpstreamResponse:
    """POST to a Google API; its error answers read as Google's (by `reader`)."""
    reader = reader or ErrorReader()
    request = build_request(upstream, url, body, headers)
    try:
        return await send(client, upstream, request, stream=stream, parse_error=reader)
    except UpstreamError as exc:
        raise reader.refine(upstream, exc) from exc


# --- OpenAI request -> Gemini request ---------------------------------------------------------


def _bad_request(message: str) -> UpstreamError:
    return UpstreamError(400, message, type="invalid_request_error")


# Between a tool call's own id and its thought signature (base64url: never two underscores
# around `ts`, which ids made here never hold either).
SIGNATURE_MARK = "__ts__"


def call_id_with_signature(call_id: str, signature: str | None) -> str:
    if not signature:
        return call_id
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        return call_id  # not base64: nothing Google would take back anyway
    return call_id + SIGNATURE_MARK + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def signature_of(call_id: str | None) -> str | None:
    """The thought signature a tool call's id carries, as Google sent it (standard base64)."""
    if not call_id or SIGNATURE_MARK not in call_id:
        return None
    encoded = call_id.partition(SIGNATURE_MARK)[2]
    try:
        raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except (binascii.Error, ValueError):
        return None
    return base64.b64encode(raw).decode() if raw else None


def _data_url_blob(url: str) -> Blob:
    header, comma, data = url.partition(",")
    if not comma:
        raise _bad_request("malformed data: URL")
    mime_type = header[len("data:") :].split(";", 1)[0] or "application/octet-stream"
    if header.endswith(";base64"):
        return Blob(mime_type, data)
    return Blob(mime_type, base64.b64encode(unquote_to_bytes(data)).decode())


def _file_ref(url: str) -> FileRef:
    # Google needs the type of what it fetches; a URL's name is all the gateway knows of it.
    mime_type, _ = mimetypes.guess_type(urlsplit(url).path)
    if mime_type is None:
        raise _bad_request(
            "a Gemini model takes a URL only if its name tells the file's type "
            "(e.g. .png, .jpg, .pdf); send the image inline as a data: URL instead"
        )
    return FileRef(mime_type, url)


def _media_part(url: str) -> Part:
    if url.startswith("data:"):
        return Part(inline_data=_data_url_blob(url))
    if url.startswith(("https://", "http://", "gs://")):
        return Part(file_data=_file_ref(url))
    raise _bad_request("image_url must be an http(s) or gs:// URL or a data: URL")


def _audio_part(audio: dict[str, Any]) -> Part:
    data, kind = audio.get("data"), audio.get("format")
    if not isinstance(data, str) or not isinstance(kind, str) or not kind.isalnum():
        raise _bad_request("input_audio needs base64 `data` and a `format` (wav, mp3, …)")
    return Part(inline_data=Blob(f"audio/{kind.lower()}", data))


def _file_part(file: dict[str, Any]) -> Part:
    data = file.get("file_data")
    if not isinstance(data, str):
        raise _bad_request("a Gemini model takes a file only inline, as `file_data`")
    if data.startswith("data:"):
        return Part(inline_data=_data_url_blob(data))
    name = file.get("filename")
    mime_type = mimetypes.guess_type(name)[0] if isinstance(name, str) else None
    return Part(inline_data=Blob(mime_type or "application/pdf", data))


def _parts(content: str | list[ContentPart] | None) -> list[Part]:
    if content is None:
        return []
    if isinstance(content, str):
        # Gemini refuses a part without data, and an empty text says nothing anyway.
        return [Part(text=content)] if content else []
    parts: list[Part] = []
    for item in content:
        if item.type == "text":
            if item.text:
                parts.append(Part(text=item.text))
        elif item.type == "image_url" and item.image_url is not None:
            parts.append(_media_part(item.image_url.url))
        elif item.type == "input_audio" and item.input_audio is not None:
            parts.append(_audio_part(item.input_audio))
        elif item.type == "file" and item.file is not None:
            parts.append(_file_part(item.file))
        elif item.type != "refusal":  # an assistant's refusal, echoed back: nothing to send
            raise _bad_request(f"a Gemini model cannot take {item.type!r} content")
    return parts


def _system_text(content: str | list[ContentPart] | None) -> list[Part]:
    if isinstance(content, list) and any(part.type != "text" for part in content):
        raise _bad_request("a Gemini system instruction can hold text only")
    return _parts(content)


def _arguments(call: ToolCall) -> Raw:
    text = call.function.arguments or "{}"
    try:
        _object_decoder.decode(text)
    except msgspec.DecodeError as exc:
        raise _bad_request(
            f"tool call {call.id or call.function.name!r}: arguments must be a JSON object"
        ) from exc
    return Raw(text.encode())


def _function_call_part(call: ToolCall) -> Part:
    if not call.function.name:
        raise _bad_request("every assistant tool call needs a function name")
    return Part(
        function_call=FunctionCall(call.function.name, _arguments(call)),
        thought_signature=signature_of(call.id),
    )


def _tool_output(content: str | list[ContentPart] | None) -> Raw:
    """A tool result as the JSON object Gemini wants: the result itself if it is one, else the
    text under `output` (Google's documented key)."""
    if isinstance(content, list):
        if any(part.type != "text" for part in content):
            raise _bad_request("a Gemini tool result can hold text only")
        text = "\n".join(part.text or "" for part in content)
    else:
        text = content or ""
    try:
        _object_decoder.decode(text)
    except msgspec.DecodeError:
        return Raw(msgspec.json.encode({"output": text}))
    return Raw(text.encode())


def _function_response_part(message: Message, names: dict[str, str]) -> Part:
    name = names.get(message.tool_call_id or "") or message.name
    if not name:
        raise _bad_request(
            "a tool message must answer a tool call of an earlier assistant message "
            "(its tool_call_id), since Gemini pairs results with calls by function name"
        )
    return Part(function_response=FunctionResponse(name, _tool_output(message.content)))


def gemini_contents(messages: list[Message]) -> tuple[Content | None, list[Content]]:
    """The `systemInstruction` and the `contents` for OpenAI's `messages`."""
    system: list[Part] = []
    contents: list[Content] = []
    # OpenAI pairs a result with its call by id, Gemini by function name: remember the names.
    names: dict[str, str] = {}
    for message in messages:
        if message.role in ("system", "developer"):
            system += _system_text(message.content)
            continue
        if message.role == "assistant":
            role, parts = "model", _parts(message.content)
            for call in message.tool_calls or ():
                parts.append(_function_call_part(call))
                if call.id and call.function.name:
                    names[call.id] = call.function.name
        elif message.role in ("tool", "function"):
            # A function's result is what the user side tells the model.
            role, parts = "user", [_function_response_part(message, names)]
        else:
            role, parts = "user", _parts(message.content)
        if not parts:
            continue
        if contents and contents[-1].role == role:
            contents[-1].parts.extend(parts)
        else:
            contents.append(Content(parts, role))
    if not contents:
        raise _bad_request("a Gemini model needs at least one user or assistant message")
    return (Content(system) if system else None), contents


def _tools(request: ChatRequest) -> tuple[list[Tool] | None, ToolConfig | None]:
    if not request.tools:
        return None, None
    declarations = [
        FunctionDeclaration(tool.function.name, tool.function.description, tool.function.parameters)
        for tool in request.tools
    ]
    tools = [Tool(declarations)]
    choice = request.tool_choice
    if choice is None:
        return tools, None
    if isinstance(choice, NamedToolChoice):
        config = FunctionCallingConfig("ANY", [choice.function.name])
    else:
        # `none` keeps the tools offered, so that earlier calls in the history make sense.
        config = FunctionCallingConfig({"auto": "AUTO", "required": "ANY", "none": "NONE"}[choice])
    return tools, ToolConfig(config)


def _generation_config(request: ChatRequest, upstream: Upstream) -> GenerationConfig:
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    mime_type = schema = None
    response_format = request.response_format
    if response_format is not None and response_format.type != "text":
        mime_type = "application/json"
        if response_format.type == "json_schema":
            # OpenAI wraps the schema: {"name": ..., "schema": {...}, "strict": ...}.
            inner = (response_format.json_schema or {}).get("schema")
            schema = inner if isinstance(inner, dict) else None
    return GenerationConfig(
        stop_sequences=stop or None,
        response_mime_type=mime_type,
        response_json_schema=schema,
        candidate_count=request.n if request.n and request.n > 1 else None,
        max_output_tokens=max_tokens_for(request, upstream),
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
    )


def gemini_request(call: ChatCall, upstream: Upstream) -> GenerateContentRequest:
    request = call.request
    system, contents = gemini_contents(request.messages)
    tools, tool_config = _tools(request)
    return GenerateContentRequest(
        contents=contents,
        system_instruction=system,
        tools=tools,
        tool_config=tool_config,
        generation_config=_generation_config(request, upstream),
    )


def chat_body(call: ChatCall, upstream: Upstream) -> bytes:
    """The `generateContent` (and `streamGenerateContent`) body for `call`."""
    return msgspec.json.encode(gemini_request(call, upstream))


# --- Gemini answer -> OpenAI answer -----------------------------------------------------------

_FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "IMAGE_PROHIBITED_CONTENT": "content_filter",
}


def finish_reason(reason: str | None, called_tools: bool) -> str:
    # Others (OTHER, LANGUAGE, MALFORMED_FUNCTION_CALL, new ones) end the answer as it is.
    mapped = _FINISH_REASONS.get(reason or "", "stop")
    # OpenAI's clients look for `tool_calls` to know they have calls to run.
    return "tool_calls" if called_tools and mapped == "stop" else mapped


def usage_counts(meta: UsageMetadata | None) -> tuple[int | None, int | None]:
    """(prompt, completion) tokens from `usageMetadata`; None where no count was sent."""
    if meta is None:
        return None, None
    prompt = token_count(meta.prompt_token_count)
    if prompt is not None:
        prompt += token_count(meta.tool_use_prompt_token_count) or 0
    candidates = token_count(meta.candidates_token_count)
    thoughts = token_count(meta.thoughts_token_count)
    completion = None if candidates is None else candidates + (thoughts or 0)
    return prompt, completion


def _ratings(ratings: list[Any]) -> str:
    flagged = [f"{r.category}: {r.probability}" for r in ratings if r.blocked or r.probability]
    flagged = [text for text in flagged if not text.endswith(("NEGLIGIBLE", "LOW"))]
    return f" ({', '.join(flagged[:8])})" if flagged else ""


def blocked_prompt(upstream: Upstream, feedback: PromptFeedback) -> UpstreamError:
    """Google refused the prompt itself: the request's own fault, so neither retried nor sent
    to another deployment, which would refuse it too."""
    reason = feedback.block_reason or "BLOCK_REASON_UNSPECIFIED"
    detail = feedback.block_reason_message or ""
    return UpstreamError(
        400,
        f"{upstream.provider} blocked the prompt: {reason}{_ratings(feedback.safety_ratings)}"
        + (f": {detail}" if detail else ""),
        type="invalid_request_error",
        code="content_policy_violation",
    )


def _no_answer(upstream: Upstream) -> UpstreamError:
    return UpstreamError(502, f"{upstream.provider} upstream answered no candidate", retryable=True)


def _arguments_text(args: Raw) -> str:
    # Google sends an object; anything else (null, a list) is no arguments an OpenAI or
    # Anthropic client could read as such.
    text = bytes(args).strip()
    return text.decode() if text.startswith(b"{") else "{}"


def _asked_for(candidates: list[Candidate], request: ChatRequest) -> list[Candidate]:
    """The candidates the client asked for, once each, in order: an upstream's indices are
    untrusted, and every surface's renderer counts on choices 0 to n - 1."""
    wanted = request.n or 1
    by_index: dict[int, Candidate] = {}
    for candidate in candidates:
        if 0 <= candidate.index < wanted:
            by_index.setdefault(candidate.index, candidate)
    return [by_index[index] for index in sorted(by_index)]


class _Reply(msgspec.Struct):
    """One candidate's answer: its text (thoughts left out) and its tool calls."""

    text: str
    calls: list[ToolCall]


def _reply(candidate: Candidate, request_id: str, first_call: int = 0) -> _Reply:
    texts: list[str] = []
    calls: list[ToolCall] = []
    for part in candidate.content.parts if candidate.content else ():
        if part.thought:
            continue
        if part.text:
            texts.append(part.text)
        if part.function_call is not None:
            number = first_call + len(calls)
            choice = f"{candidate.index}_" if candidate.index else ""
            base = part.function_call.id or f"call_{request_id}_{choice}{number}"
            calls.append(
                ToolCall(
                    OpenAIFunctionCall(
                        part.function_call.name, _arguments_text(part.function_call.args)
                    ),
                    id=call_id_with_signature(base, part.thought_signature),
                )
            )
    return _Reply("".join(texts), calls)


def completion_of(
    call: ChatCall, upstream: Upstream, answer: GenerateContentResponse
) -> ChatResult:
    """A whole `generateContent` answer as OpenAI's chat completion."""
    if not answer.candidates:
        if answer.prompt_feedback is not None and answer.prompt_feedback.block_reason:
            raise blocked_prompt(upstream, answer.prompt_feedback)
        raise _no_answer(upstream)
    choices: list[Choice] = []
    written: list[str] = []
    candidates = _asked_for(answer.candidates, call.request)
    if not candidates:
        raise _no_answer(upstream)
    for candidate in candidates:
        reply = _reply(candidate, call.request_id)
        written.append(completion_text(reply.text, reply.calls))
        message = ResponseMessage(
            # OpenAI's answers that call tools and say nothing have `content: null`.
            content=reply.text or (None if reply.calls else ""),
            tool_calls=reply.calls or None,
        )
        reason = finish_reason(candidate.finish_reason, bool(reply.calls))
        choices.append(Choice(len(choices), message, reason))
    prompt, completion = usage_counts(answer.usage_metadata)
    usage, estimated = usage_or_estimate(prompt, completion, call, "".join(written))
    completion_body = ChatCompletion(
        id=call.request_id, model=upstream.model, choices=choices, usage=usage
    )
    return ChatResult(completion=completion_body, usage=usage, usage_estimated=estimated)


def _stream_error(upstream: Upstream, status: ErrorStatus) -> UpstreamError:
    http_status = status.code if 400 <= status.code <= 599 else 0
    http_status = http_status or _STATUS_OF_CODE.get(status.status, 500)
    error = google_failure(upstream, http_status, status)
    error.message = f"{upstream.provider} upstream failed mid-stream: {status.message}"
    return error


class GeminiStream:
    """Gemini's SSE events (each a `GenerateContentResponse` with the next parts), translated
    into neutral stream events.

    A choice's `Start` waits for its first content or finish, so that a blocked prompt or an
    error sent as the first event comes before anything was yielded, and the router can still
    fall back. Gemini closes the stream without a closing event: the answer is complete when
    every candidate that began has finished.
    """

    def __init__(self, call: ChatCall, upstream: Upstream, response: UpstreamResponse) -> None:
        self.usage: Usage | None = None
        self.usage_estimated = False
        self.receipt: bytes | None = None
        self._call = call
        self._upstream = upstream
        self._response = response
        self._created = int(time.time())
        self._written: list[str] = []
        self._prompt_count: int | None = None
        self._completion_count: int | None = None
        # Per choice: whether it began, how many tool calls it made, whether it finished.
        self._started: set[int] = set()
        self._calls: dict[int, int] = {}
        self._finished: set[int] = set()

    async def __aiter__(self) -> AsyncIterator[Event]:
        try:
            async for event in self._events():
                yield event
        finally:
            if self.usage is None:
                # Cut short (an error, or the client went away): count what did arrive, by
                # Gemini's count so far but never less than the estimate of what was written.
                written = "".join(self._written)
                completion = max(self._completion_count or 0, estimate_text_tokens(written))
                self.usage, _ = usage_or_estimate(
                    self._prompt_count, completion, self._call, written
                )
                self.usage_estimated = True

    async def _events(self) -> AsyncIterator[Event]:
        async for sse in iter_sse(self._response, self._upstream):
            chunk = decode_json(_response_decoder, sse.data, self._upstream)
            if chunk.error is not None:
                raise _stream_error(self._upstream, chunk.error)
            self._note_usage(chunk.usage_metadata)
            feedback = chunk.prompt_feedback
            if not chunk.candidates and feedback is not None and feedback.block_reason:
                raise blocked_prompt(self._upstream, feedback)
            for candidate in chunk.candidates:
                for event in self._candidate_events(candidate):
                    yield event
        if not self._started or self._started - self._finished:
            # No finish reason for a candidate: the answer was cut off, not complete.
            raise UpstreamError(
                502, f"{self._upstream.provider} upstream stream ended early", retryable=True
            )
        written = "".join(self._written)
        self.usage, self.usage_estimated = usage_or_estimate(
            self._prompt_count, self._completion_count, self._call, written
        )
        if self._call.request.include_usage:
            yield UsageReport(self.usage)

    def _note_usage(self, meta: UsageMetadata | None) -> None:
        prompt, completion = usage_counts(meta)
        # Each event's counts are the totals so far: the last ones seen are the answer's.
        if prompt is not None:
            self._prompt_count = prompt
        if completion is not None:
            self._completion_count = completion

    def _start(self, choice: int) -> list[Event]:
        if choice in self._started:
            return []
        self._started.add(choice)
        return [Start(self._call.request_id, self._upstream.model, self._created, choice)]

    def _candidate_events(self, candidate: Candidate) -> list[Event]:
        choice = candidate.index
        if not 0 <= choice < (self._call.request.n or 1) or choice in self._finished:
            return []  # a choice the client did not ask for; nothing follows a finish
        first = self._calls.get(choice, 0)
        reply = _reply(candidate, self._call.request_id, first)
        events: list[Event] = []
        if reply.text:
            self._written.append(reply.text)
            events += [*self._start(choice), TextDelta(reply.text, choice)]
        if reply.calls:
            # Gemini sends each call whole; several may come in one event or one per event.
            self._calls[choice] = first + len(reply.calls)
            self._written.append(completion_text("", reply.calls))
            fragments = [
                ToolCallFragment(number, c.id, c.function.name, c.function.arguments)
                for number, c in enumerate(reply.calls, start=first)
            ]
            events += [*self._start(choice), ToolCallDelta(fragments, choice)]
        if candidate.finish_reason:
            self._finished.add(choice)
            reason = finish_reason(candidate.finish_reason, self._calls.get(choice, 0) > 0)
            events += [*self._start(choice), Finish(reason, choice)]
        return events

    async def aclose(self) -> None:
        await self._response.aclose()


# --- the adapter ------------------------------------------------------------------------------


def model_path(model: str) -> str:
    """`models/{model}`, unless the deployment named a full resource already (a tuned model)."""
    return model if model.startswith(("models/", "tunedModels/")) else f"models/{model}"


class GeminiAdapter:
    """Speaks the Gemini API at `base_url` (default `https://generativelanguage.googleapis.com`).

    `adapters.vertex` reuses it with Vertex AI's URL and a service account's token: the two
    differ only in `method_url` and `auth_headers`.
    """

    def __init__(self, upstream: Upstream, client: UpstreamClient) -> None:
        self.upstream = upstream
        self.client = client

    def method_url(self, method: str) -> str:
        base = (self.upstream.base_url or DEFAULT_BASE_URL).rstrip("/")
        if not re.search(r"/v\d[a-z0-9]*$", base):
            base = join_url(base, self.upstream.api_version or DEFAULT_API_VERSION)
        return join_url(base, f"{model_path(self.upstream.model)}:{method}")

    async def auth_headers(self) -> dict[str, str]:
        key = self.upstream.api_key
        return {"x-goog-api-key": key} if key else {}

    async def _post(self, method: str, body: bytes, *, stream: bool = False) -> UpstreamResponse:
        headers = await self.auth_headers()
        url = self.method_url(method)
        return await send_to_google(self.client, self.upstream, url, body, headers, stream=stream)

    async def chat(self, call: ChatCall) -> ChatResult:
        response = await self._post("generateContent", chat_body(call, self.upstream))
        answer = decode_json(_response_decoder, response.content, self.upstream)
        if answer.error is not None:
            raise _stream_error(self.upstream, answer.error)
        return completion_of(call, self.upstream, answer)

    async def open_stream(self, call: ChatCall) -> GeminiStream:
        body = chat_body(call, self.upstream)
        response = await self._post("streamGenerateContent?alt=sse", body, stream=True)
        return GeminiStream(call, self.upstream, response)

    async def complete(self, call: CompletionCall) -> WireResult:
        raise does_not_serve(self.upstream.provider, "legacy text completions")

    async def images(self, call: ImageCall) -> WireResult:
        raise does_not_serve(self.upstream.provider, "image generations")

    async def embed(self, call: EmbedCall) -> EmbedResult:
        request = call.request
        texts = request.texts()
        if isinstance(request.input, str):
            body = EmbedContentRequest(
                Content([Part(text=texts[0])]), output_dimensionality=request.dimensions
            )
            response = await self._post("embedContent", msgspec.json.encode(body))
            answer = decode_json(_embed_decoder, response.content, self.upstream)
            vectors = [answer.embedding.values] if answer.embedding else []
        else:
            vectors = []
            for start in range(0, len(texts), EMBED_BATCH):
                vectors += await self._batch(texts[start : start + EMBED_BATCH], request.dimensions)
        if len(vectors) != len(texts):
            raise UpstreamError(
                502,
                f"{self.upstream.provider} upstream sent {len(vectors)} embeddings "
                f"for {len(texts)} inputs",
                retryable=True,
            )
        return embed_result(self.upstream, call, vectors, None)

    async def _batch(self, texts: list[str], dimensions: int | None) -> list[list[float]]:
        model = model_path(self.upstream.model)
        requests = [
            EmbedContentRequest(Content([Part(text=text)]), model, dimensions) for text in texts
        ]
        body = msgspec.json.encode(BatchEmbedContentsRequest(requests))
        response = await self._post("batchEmbedContents", body)
        answer = decode_json(_batch_decoder, response.content, self.upstream)
        return [embedding.values for embedding in answer.embeddings]


def embed_result(
    upstream: Upstream, call: EmbedCall, vectors: list[list[float]], tokens: int | None
) -> EmbedResult:
    """OpenAI's embedding list for `vectors`; tokens estimated where Google counted none."""
    request = call.request
    data = [
        Embedding(index, encode_embedding(vector, request.encoding_format))
        for index, vector in enumerate(vectors)
    ]
    estimated = tokens is None
    if tokens is None:
        tokens = sum(estimate_text_tokens(text) for text in request.texts())
    result = EmbeddingList(data, upstream.model, EmbeddingUsage(tokens, tokens))
    return EmbedResult(embeddings=result, usage=Usage(tokens, 0, tokens), usage_estimated=estimated)
