"""The `echo` demo model: deterministic chat and embeddings with no provider at all.

It exists so that a fresh node answers at once and so that budgets, usage and the ledger can
be tried and tested without a provider key. Chat answers `echo: <last user message>`, one
word per token (so `max_tokens` cuts it and sets `finish_reason: "length"`); when the client
forces a tool (`tool_choice` "required" or a named function) it calls that tool with the
last user message as `{"input": …}`, cut off at `max_tokens` like any output. Embeddings
are unit vectors derived from a hash of the input. Usage is counted, never estimated: prompt
tokens by the shared estimator, completion tokens as words.
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
from adapters.tokens import estimate_prompt_tokens, estimate_text_tokens, message_text
from adapters.types import (
    ChatCall,
    ChatCompletion,
    ChatResult,
    Choice,
    EmbedCall,
    Embedding,
    EmbeddingList,
    EmbeddingUsage,
    EmbedResult,
    FunctionCall,
    NamedToolChoice,
    ResponseMessage,
    ToolCall,
    Upstream,
    Usage,
    encode_embedding,
)


class _Answer(msgspec.Struct):
    words: list[str]
    tool_call: ToolCall | None
    finish_reason: str
    usage: Usage


def _last_user_text(call: ChatCall) -> str:
    for message in reversed(call.request.messages):
        if message.role == "user":
            return message_text(message.content)
    return ""


def _forced_tool(call: ChatCall) -> str | None:
    request = call.request
    if not request.tools:
        return None
    if isinstance(request.tool_choice, NamedToolChoice):
        return request.tool_choice.function.name
    if request.tool_choice == "required":
        return request.tools[0].function.name
    return None


def _tool_answer(call: ChatCall, tool: str, text: str, limit: int, prompt: int) -> _Answer:
    """A forced tool call, cut (finish_reason "length") where `max_tokens` runs out, as a
    real model's would be: its arguments are then unfinished JSON."""
    arguments = msgspec.json.encode({"input": text}).decode()
    finish = "tool_calls"
    room = limit - estimate_text_tokens(tool)
    if estimate_text_tokens(arguments) > room:
        arguments, finish = _cut_to_tokens(arguments, max(0, room)), "length"
    completion = min(limit, estimate_text_tokens(tool) + estimate_text_tokens(arguments))
    tool_call = ToolCall(
        id="call_" + call.request_id[-24:],
        function=FunctionCall(name=tool, arguments=arguments),
    )
    return _Answer([], tool_call, finish, Usage(prompt, completion, prompt + completion))


def _cut_to_tokens(text: str, tokens: int) -> str:
    """The longest prefix of `text` the estimator counts as at most `tokens` tokens."""
    cut = text[: tokens * 4]
    while cut and estimate_text_tokens(cut) > tokens:
        cut = cut[: len(cut) - max(1, (len(cut.encode()) - tokens * 4 + 3) // 4)]
    return cut


def _answer(call: ChatCall, upstream: Upstream) -> _Answer:
    prompt_tokens = estimate_prompt_tokens(call.request.messages)
    text = _last_user_text(call)
    tool = _forced_tool(call)
    limit = min(call.request.output_limit or upstream.max_output_tokens, upstream.max_output_tokens)
    if tool is not None:
        return _tool_answer(call, tool, text, limit, prompt_tokens)
    words = ("echo: " + text).split(" ")
    finish = "stop"
    if len(words) > limit:
        words, finish = words[:limit], "length"
    usage = Usage(prompt_tokens, len(words), prompt_tokens + len(words))
    return _Answer(words, None, finish, usage)


class EchoAdapter:
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    async def _pause(self) -> None:
        if self.upstream.latency_ms:
            await asyncio.sleep(self.upstream.latency_ms / 1000)

    async def chat(self, call: ChatCall) -> ChatResult:
        await self._pause()
        answer = _answer(call, self.upstream)
        message = ResponseMessage(
            content=None if answer.tool_call else " ".join(answer.words),
            tool_calls=[answer.tool_call] if answer.tool_call else None,
        )
        completion = ChatCompletion(
            id=call.request_id,
            model=self.upstream.model,
            choices=[Choice(0, message, answer.finish_reason)],
            usage=answer.usage,
        )
        return ChatResult(completion=completion, usage=answer.usage)

    async def open_stream(self, call: ChatCall) -> EchoStream:
        await self._pause()
        return EchoStream(call, self.upstream, _answer(call, self.upstream))

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
        yield Start(self._call.request_id, self._upstream.model, int(time.time()))
        if answer.tool_call is not None:
            function = answer.tool_call.function
            call = ToolCallFragment(0, answer.tool_call.id, function.name, function.arguments)
            yield ToolCallDelta([call])
        for position, word in enumerate(answer.words):
            yield TextDelta(word if position == 0 else " " + word)
        yield Finish(answer.finish_reason)
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
