"""The `echo` demo model: deterministic chat and embeddings with no provider at all.

It exists so that a fresh node answers at once and so that budgets, usage, the ledger and
clients' structured output can be tried and tested without a provider key. It honours the
request as a model would, the same way every time:

- it calls a tool when `tool_choice` names one, when it is "required" (the first tool), and
  for "auto" (the default with tools) when the last user message contains a tool's name
  (the first such tool, ignoring case); the arguments are an instance of the function's
  `parameters` (`adapters.schema_instance`), its strings the user's message, or
  `{"input": <message>}` for a function that declares no parameters;
- otherwise, with `response_format` `json_schema` (the Responses API's `text.format`
  arrives as this) the content is an instance of the schema, with `json_object` it is
  `{"echo": <message>}`;
- otherwise it answers `echo: <last user message>`, one word per token;
- `n` gives `n` choices, all alike, streamed one after another with their indexes.

Every output is cut where `max_tokens` runs out and then finishes with "length" (a cut tool
call or JSON content is unfinished JSON, as a real model's would be). Embeddings are unit
vectors derived from a hash of the input. Usage is counted, never estimated: prompt tokens by
the shared estimator, completion tokens as words for text and by the estimator for JSON, for
all choices together.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator

import msgspec

from adapters.events import (
    Event,
    Finish,
    Start,
    TextDelta,
    ToolCallDelta,
    ToolCallFragment,
    UsageReport,
)
from adapters.schema_instance import schema_instance
from adapters.tokens import estimate_prompt_tokens, estimate_text_tokens, message_text
from adapters.types import (
    ChatCall,
    ChatCompletion,
    ChatResult,
    Choice,
    CompletionCall,
    EmbedCall,
    Embedding,
    EmbeddingList,
    EmbeddingUsage,
    EmbedResult,
    FunctionCall,
    FunctionDef,
    ImageCall,
    NamedToolChoice,
    ResponseMessage,
    ToolCall,
    Upstream,
    Usage,
    WireResult,
    does_not_serve,
    encode_embedding,
)


class _Output(msgspec.Struct):
    """One choice's answer: its text in the pieces it streams as, or a tool call."""

    pieces: list[str]
    tool_call: ToolCall | None
    finish_reason: str
    tokens: int


class _Answer(msgspec.Struct):
    outputs: list[_Output]
    usage: Usage


def _last_user_text(call: ChatCall) -> str:
    for message in reversed(call.request.messages):
        if message.role == "user":
            return message_text(message.content)
    return ""


def _chosen_tool(call: ChatCall, text: str) -> FunctionDef | None:
    """The tool the answer calls: the one named by `tool_choice`, the first for "required",
    and for "auto" (the default with tools) the first whose name the last user message
    contains, ignoring case; none for "none" or when no tool is named."""
    request = call.request
    if not request.tools or request.tool_choice == "none":
        return None
    functions = [tool.function for tool in request.tools]
    if isinstance(request.tool_choice, NamedToolChoice):
        name = request.tool_choice.function.name
        return next((f for f in functions if f.name == name), FunctionDef(name=name))
    if request.tool_choice == "required":
        return functions[0]
    lowered = text.lower()
    return next((f for f in functions if f.name.lower() in lowered), None)


def _arguments(function: FunctionDef, text: str) -> str:
    """The call's arguments: an instance of the function's parameters; a function that
    declares none gets the user's message as `{"input": …}`."""
    if function.parameters is None:
        return msgspec.json.encode({"input": text}).decode()
    return msgspec.json.encode(schema_instance(function.parameters, text)).decode()


def _structured_content(call: ChatCall, text: str) -> str | None:
    """The JSON content `response_format` asks for, if it asks: an instance of the
    `json_schema`'s schema, or for `json_object` an object holding the echo."""
    response_format = call.request.response_format
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return msgspec.json.encode({"echo": text}).decode()
    schema = (response_format.json_schema or {}).get("schema", {})
    return msgspec.json.encode(schema_instance(schema, text)).decode()


def _tool_output(
    call: ChatCall, choice: int, function: FunctionDef, text: str, limit: int
) -> _Output:
    """A tool call, cut (finish_reason "length") where `max_tokens` runs out, as a real
    model's would be: its arguments are then unfinished JSON."""
    tool = function.name
    arguments = _arguments(function, text)
    finish = "tool_calls"
    room = limit - estimate_text_tokens(tool)
    if estimate_text_tokens(arguments) > room:
        arguments, finish = _cut_to_tokens(arguments, max(0, room)), "length"
    tokens = min(limit, estimate_text_tokens(tool) + estimate_text_tokens(arguments))
    suffix = f"_{choice}" if choice else ""
    tool_call = ToolCall(
        id="call_" + call.request_id[-24:] + suffix,
        function=FunctionCall(name=tool, arguments=arguments),
    )
    return _Output([], tool_call, finish, tokens)


def _json_output(content: str, limit: int) -> _Output:
    """JSON content, counted by the estimator and cut where `max_tokens` runs out."""
    finish = "stop"
    if estimate_text_tokens(content) > limit:
        content, finish = _cut_to_tokens(content, limit), "length"
    pieces = [content[i : i + _JSON_PIECE] for i in range(0, len(content), _JSON_PIECE)]
    return _Output(pieces, None, finish, min(limit, estimate_text_tokens(content)))


def _text_output(text: str, limit: int) -> _Output:
    """`echo: <text>`, one word per token."""
    words = ("echo: " + text).split(" ")
    finish = "stop"
    if len(words) > limit:
        words, finish = words[:limit], "length"
    pieces = [word if position == 0 else " " + word for position, word in enumerate(words)]
    return _Output(pieces, None, finish, len(words))


# Structured content streams in pieces of this many characters (a few tokens each).
_JSON_PIECE = 16


def _cut_to_tokens(text: str, tokens: int) -> str:
    """The longest prefix of `text` the estimator counts as at most `tokens` tokens."""
    cut = text[: tokens * 4]
    while cut and estimate_text_tokens(cut) > tokens:
        cut = cut[: len(cut) - max(1, (len(cut.encode()) - tokens * 4 + 3) // 4)]
    return cut


def _output(call: ChatCall, choice: int, text: str, limit: int) -> _Output:
    function = _chosen_tool(call, text)
    if function is not None:
        return _tool_output(call, choice, function, text, limit)
    content = _structured_content(call, text)
    if content is not None:
        return _json_output(content, limit)
    return _text_output(text, limit)


def _answer(call: ChatCall, upstream: Upstream) -> _Answer:
    """The answer's `n` choices (the same deterministic one each: the echo has no
    temperature), each within `max_tokens`; usage counts them all, as OpenAI's does."""
    prompt_tokens = estimate_prompt_tokens(call.request.messages)
    text = _last_user_text(call)
    limit = min(call.request.output_limit or upstream.max_output_tokens, upstream.max_output_tokens)
    outputs = [_output(call, choice, text, limit) for choice in range(call.request.n or 1)]
    completion = sum(output.tokens for output in outputs)
    return _Answer(outputs, Usage(prompt_tokens, completion, prompt_tokens + completion))


class EchoAdapter:
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    async def _pause(self) -> None:
        if self.upstream.latency_ms:
            await asyncio.sleep(self.upstream.latency_ms / 1000)

    async def chat(self, call: ChatCall) -> ChatResult:
        await self._pause()
        answer = _answer(call, self.upstream)
        choices = [
            Choice(index, _message(output), output.finish_reason)
            for index, output in enumerate(answer.outputs)
        ]
        completion = ChatCompletion(
            id=call.request_id, model=self.upstream.model, choices=choices, usage=answer.usage
        )
        return ChatResult(completion=completion, usage=answer.usage)

    async def open_stream(self, call: ChatCall) -> EchoStream:
        await self._pause()
        return EchoStream(call, self.upstream, _answer(call, self.upstream))

    async def complete(self, call: CompletionCall) -> WireResult:
        raise does_not_serve(self.upstream.provider, "legacy text completions")

    async def images(self, call: ImageCall) -> WireResult:
        raise does_not_serve(self.upstream.provider, "image generations")

    async def embed(self, call: EmbedCall) -> EmbedResult:
        await self._pause()
        request = call.request
        dims = request.dimensions or self.upstream.embedding_dims
        texts = request.texts()
        data = []
        for index, text in enumerate(texts):
            vector = embedding_vector(text, dims)
            data.append(Embedding(index, encode_embedding(vector, request.encoding_format)))
        tokens = sum(estimate_text_tokens(text) for text in texts)
        body = EmbeddingList(data, self.upstream.model, EmbeddingUsage(tokens, tokens))
        return EmbedResult(embeddings=body, usage=Usage(tokens, 0, tokens))


def _message(output: _Output) -> ResponseMessage:
    if output.tool_call is not None:
        return ResponseMessage(tool_calls=[output.tool_call])
    return ResponseMessage(content="".join(output.pieces))


class EchoStream:
    def __init__(self, call: ChatCall, upstream: Upstream, answer: _Answer) -> None:
        self.usage: Usage | None = None
        self.usage_estimated = False
        self.receipt: bytes | None = None
        self._call = call
        self._upstream = upstream
        self._answer = answer

    async def __aiter__(self) -> AsyncIterator[Event]:
        answer = self._answer
        created = int(time.time())
        for choice, output in enumerate(answer.outputs):
            yield Start(self._call.request_id, self._upstream.model, created, choice)
            if output.tool_call is not None:
                function = output.tool_call.function
                call = ToolCallFragment(0, output.tool_call.id, function.name, function.arguments)
                yield ToolCallDelta([call], choice)
            for piece in output.pieces:
                yield TextDelta(piece, choice)
            yield Finish(output.finish_reason, choice)
        self.usage = answer.usage
        if self._call.request.include_usage:
            yield UsageReport(answer.usage)

    async def aclose(self) -> None:
        return None


def embedding_vector(text: str, dims: int) -> list[float]:
    """A deterministic unit vector for `text`: SHAKE-256 bytes mapped to [-1, 1]."""
    raw = hashlib.shake_256(text.encode()).digest(2 * dims)
    values = [
        (int.from_bytes(raw[i : i + 2], "little") / 32767.5) - 1.0 for i in range(0, len(raw), 2)
    ]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [v / norm for v in values]
