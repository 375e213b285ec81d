"""Google's Gemini API (`generativelanguage`): `models/{model}:generateContent`,
`:streamGenerateContent?alt=sse`, `:embedContent` and `:batchEmbedContents`.

The request is translated in `adapters.gemini_request`, errors are read in
`adapters.gemini_errors`, the wire types are in `adapters.gemini_wire`; this module reads the
answers and streams back into OpenAI's terms and holds the adapter, which Vertex AI reuses with
its own URL and credentials (`adapters.vertex`). What differs from OpenAI in the answers:

- The key travels as `x-goog-api-key`, never in the URL. The API version is a path segment
  (`v1beta` unless the deployment's `api_version` says otherwise).
- A prompt Google blocks (`promptFeedback.blockReason`) is the client's 400
  (`content_policy_violation`), never retried; an answer stopped for safety, recitation or a
  blocklist ends with `content_filter`. A thinking model's thought summaries are left out.
- Usage is `usageMetadata`: the prompt's count (which includes cached tokens) plus tokens
  tools added; the candidates' count plus a thinking model's thoughts.
- A stream is a sequence of answers' next parts, one per SSE event, with no closing event: it
  is complete when every candidate has a finish reason. Each function call arrives whole, in
  the event that carries it.
- Candidates are OpenAI's choices (`n`); those past what the client asked for are ignored.
- Embeddings carry no token counts: they are estimated.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from msgspec import Raw

from adapters.events import (
    Event,
    Finish,
    Start,
    TextDelta,
    ToolCallDelta,
    ToolCallFragment,
    UsageReport,
)
from adapters.gemini_errors import error_event, send_to_google
from adapters.gemini_request import call_id_with_signature, chat_body
from adapters.gemini_wire import (
    BatchEmbedContentsRequest,
    BatchEmbedContentsResponse,
    Candidate,
    Content,
    EmbedContentRequest,
    EmbedContentResponse,
    ErrorBody,
    GenerateContentResponse,
    Part,
    PromptFeedback,
    UsageMetadata,
)
from adapters.http import (
    UpstreamClient,
    UpstreamResponse,
    decode_json,
    iter_sse,
    join_url,
)
from adapters.streams import CountedStream
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
    EmbedCall,
    Embedding,
    EmbeddingList,
    EmbeddingUsage,
    EmbedResult,
    ImageCall,
    ResponseMessage,
    ToolCall,
    Upstream,
    UpstreamError,
    Usage,
    WireResult,
    does_not_serve,
    encode_embedding,
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


class GeminiStream(CountedStream):
    """Gemini's SSE events (each a `GenerateContentResponse` with the next parts), translated
    into neutral stream events.

    A choice's `Start` waits for its first content or finish, so that a blocked prompt or an
    error sent as the first event comes before anything was yielded, and the router can still
    fall back. Gemini closes the stream without a closing event: the answer is complete when
    every candidate that began has finished.
    """

    def __init__(self, call: ChatCall, upstream: Upstream, response: UpstreamResponse) -> None:
        super().__init__(call, upstream, response)
        # Per choice: whether it began, how many tool calls it made, whether it finished.
        self._started: set[int] = set()
        self._calls: dict[int, int] = {}
        self._finished: set[int] = set()

    async def _events(self) -> AsyncIterator[Event]:
        async for sse in iter_sse(self._response, self._upstream):
            chunk = decode_json(_response_decoder, sse.data, self._upstream)
            if chunk.error is not None:
                raise error_event(self._upstream, chunk.error)
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
            raise error_event(self.upstream, answer.error)
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
