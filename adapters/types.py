"""The gateway's wire types (OpenAI's chat and embeddings formats) and the adapter contract.

Every adapter turns a `ChatCall`/`EmbedCall` into its provider's wire format and answers with
typed results (`ChatResult` holds a `ChatCompletion`, `EmbedResult` an `EmbeddingList`) and,
streamed, the neutral events of `adapters.events`: no adapter writes an ingress's bytes. An
OpenAI-compatible upstream's answer is kept as the bytes it sent (`wire`), decoded only when
asked, so that an OpenAI client gets them untouched. Requests are validated into these Structs;
the raw top-level fields are kept beside them (`ChatCall.raw`) so that an OpenAI-compatible
upstream receives every field the client sent, including ones this gateway does not know yet.
"""

from __future__ import annotations

import base64
import email.utils
import math
import re
import struct
import time
from collections.abc import AsyncIterator
from datetime import UTC
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol, TypeVar, runtime_checkable

import msgspec
from msgspec import Meta, Raw, Struct

if TYPE_CHECKING:
    from adapters.events import Event

ModelName = Annotated[str, Meta(min_length=1, max_length=256)]
PositiveInt = Annotated[int, Meta(ge=1)]
_T = TypeVar("_T")

# --- requests -----------------------------------------------------------------------------


class ImageUrl(Struct, omit_defaults=True):
    url: str
    detail: str | None = None


class ContentPart(Struct, omit_defaults=True):
    """One part of a multi-part message; unknown part types are kept as they are."""

    type: str
    text: str | None = None
    image_url: ImageUrl | None = None
    input_audio: dict[str, Any] | None = None
    file: dict[str, Any] | None = None


class FunctionCall(Struct, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCall(Struct, omit_defaults=True, tag_field="type", tag="function"):
    # `type` is a tag so that it is always encoded ("function"), as OpenAI's clients expect.
    function: FunctionCall
    id: str | None = None
    index: int | None = None


class Message(Struct, omit_defaults=True):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None


class FunctionDef(Struct, omit_defaults=True):
    name: Annotated[str, Meta(min_length=1, max_length=128)]
    description: str | None = None
    # A JSON Schema: arbitrary JSON, hence a dict (msgspec.Raw cannot be optional).
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Struct, omit_defaults=True):
    function: FunctionDef
    type: Literal["function"] = "function"


class NamedFunction(Struct):
    name: str


class NamedToolChoice(Struct, omit_defaults=True):
    function: NamedFunction
    type: Literal["function"] = "function"


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ResponseFormat(Struct, omit_defaults=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class StreamOptions(Struct, omit_defaults=True):
    include_usage: bool = False


class ChatRequest(Struct, omit_defaults=True):
    """The fields of a chat completion request that the gateway reads or translates."""

    model: ModelName
    messages: Annotated[list[Message], Meta(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    n: Annotated[int, Meta(ge=1, le=16)] | None = None
    stop: str | Annotated[list[str], Meta(max_length=16)] | None = None
    presence_penalty: Annotated[float, Meta(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Meta(ge=-2, le=2)] | None = None
    seed: int | None = None
    user: str | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    @property
    def output_limit(self) -> int | None:
        """The client's cap on generated tokens, whichever of the two fields it used."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


EmbeddingInput = (
    Annotated[str, Meta(max_length=1_000_000)]
    | Annotated[list[str | int | list[int]], Meta(min_length=1, max_length=2048)]
)


class EmbeddingRequest(Struct, omit_defaults=True):
    model: ModelName
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Meta(ge=1, le=65536)] | None = None
    user: str | None = None

    def __post_init__(self) -> None:
        # msgspec unions allow one array type, so the input's four OpenAI shapes (a string,
        # strings, token ids, lists of token ids) are checked for homogeneity here.
        if isinstance(self.input, list):
            kind = type(self.input[0])
            if any(type(item) is not kind for item in self.input):
                raise ValueError("`input` must be a string, strings, token ids or lists of ids")

    def texts(self) -> list[str]:
        """The inputs as strings; token-id inputs are rendered as space-separated ids."""
        if isinstance(self.input, str):
            return [self.input]
        if not self.input or isinstance(self.input[0], str):
            return list(self.input)  # type: ignore[arg-type]
        if isinstance(self.input[0], int):
            return [" ".join(map(str, self.input))]
        return [" ".join(map(str, ids)) for ids in self.input]  # type: ignore[union-attr]


# --- responses ----------------------------------------------------------------------------


class CompletionRequest(Struct, omit_defaults=True):
    """A legacy text completion (`POST /v1/completions`): what the gateway reads of it to
    route and reserve; every other field passes through untouched."""

    model: str
    # A string, a list of strings, or token ids (a list of ints, or of lists of ints): read
    # only for its size, so any JSON list is let through to the upstream to judge.
    prompt: str | list[Any] = ""
    # OpenAI's default is 16: the gateway sends it explicitly when the client set none.
    max_tokens: Annotated[int, Meta(ge=0)] | None = None
    n: Annotated[int, Meta(ge=1, le=128)] = 1
    # The upstream writes `best_of` completions and bills them all, returning `n`.
    best_of: Annotated[int, Meta(ge=1, le=128)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ImageRequest(Struct, omit_defaults=True):
    """An image generation (`POST /v1/images/generations`): priced per image, so only the
    count asked for is read; the rest (size, quality, response_format…) passes through."""

    model: str
    prompt: str
    n: Annotated[int, Meta(ge=1, le=10)] = 1
    stream: bool = False


class Usage(Struct, omit_defaults=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ResponseMessage(Struct, omit_defaults=True, tag_field="role", tag="assistant"):
    # `role` is a tag so that it is always encoded, even with omit_defaults.
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    refusal: str | None = None


class Choice(Struct):
    index: int
    message: ResponseMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(Struct, tag_field="object", tag="chat.completion"):
    id: str
    model: str
    choices: list[Choice]
    usage: Usage
    created: int = msgspec.field(default_factory=lambda: int(time.time()))


class Delta(Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    refusal: str | None = None


class ChunkChoice(Struct):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(
    Struct, omit_defaults=True, tag_field="object", tag="chat.completion.chunk"
):
    id: str
    model: str
    created: int
    choices: list[ChunkChoice]
    usage: Usage | None = None


class Embedding(Struct, tag_field="object", tag="embedding"):
    index: int
    embedding: list[float] | str


class EmbeddingUsage(Struct):
    prompt_tokens: int = 0
    total_tokens: int = 0


class EmbeddingList(Struct, tag_field="object", tag="list"):
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


# --- the adapter contract -----------------------------------------------------------------


class Upstream(Struct, omit_defaults=True, frozen=True):
    """Where and how one deployment reaches its provider (secrets already resolved)."""

    provider: Literal[
        "openai",
        "azure",
        "anthropic",
        "ollama",
        "echo",
        "peer",
        "bedrock",
        # --- gemini / vertex (issue 18)
        "gemini",
        "vertex",
        # --- end gemini / vertex
    ]
    model: str
    base_url: str = ""
    api_key: str | None = None
    api_version: str | None = None
    headers: dict[str, str] = {}
    connect_timeout: float = 5.0
    read_timeout: float = 600.0
    max_output_tokens: int = 4096
    # What the gateway reads from an untrusted upstream at most: a whole (non-streamed) answer,
    # and one server-sent event or NDJSON line of a stream. Past either: a 502.
    max_response_bytes: int = 64 * 1024 * 1024
    max_event_bytes: int = 1024 * 1024
    # An OpenAI or Azure upstream that serves OpenAI's Responses API (`{base_url}/responses`):
    # a Responses client's request is passed through to it (`ChatCall.native`).
    responses: bool = False
    # Demo-only knobs of the echo adapter.
    latency_ms: int = 0
    embedding_dims: int = 64
    # --- bedrock: the AWS region (None: the credential chain's) and shared-config profile ---
    region: str | None = None
    profile: str | None = None
    # --- end bedrock ---
    # --- gemini / vertex (issue 18): Vertex AI's project and region, and the service
    # account's JSON key file (None: Google's Application Default Credentials).
    project: str | None = None
    location: str | None = None
    credentials_file: str | None = None
    # --- end gemini / vertex


# The client APIs an upstream may speak natively: Anthropic's Messages, OpenAI's Responses.
NativeApi = Literal["anthropic.messages", "openai.responses"]


class NativeRequest(Struct):
    """The client's request in its own API, for an upstream that speaks that API: its
    top-level fields as the ingress wants them sent (the adapter replaces only `model`, bounds
    the output cap and sets `stream`)."""

    api: NativeApi
    fields: dict[str, Raw]


class ChatCall(Struct):
    """One chat call to one deployment.

    `forward_headers` are client headers an ingress passes on to one provider's upstream
    (today the Messages ingress's `anthropic-version` and `anthropic-beta`, read only by the
    Anthropic adapter); every other adapter ignores them.

    `native`, when set, is the client's own request for an adapter whose upstream speaks the
    same API (an Anthropic upstream for a Messages client, a `responses` deployment for a
    Responses client): that adapter sends it instead of translating `request`, and answers in
    that API (`ChatResult.native`, `NativeEvent`s). Every other adapter ignores it.
    """

    request: ChatRequest
    raw: dict[str, Raw]
    request_id: str
    forward_headers: dict[str, str] = msgspec.field(default_factory=dict)
    native: NativeRequest | None = None

    def native_for(self, api: NativeApi) -> dict[str, Raw] | None:
        """The client's own fields, if it spoke `api`."""
        native = self.native
        return native.fields if native is not None and native.api == api else None


class EmbedCall(Struct):
    request: EmbeddingRequest
    raw: dict[str, Raw]
    request_id: str


class CompletionCall(Struct):
    request: CompletionRequest
    raw: dict[str, Raw]
    request_id: str


class ImageCall(Struct):
    request: ImageRequest
    raw: dict[str, Raw]
    request_id: str


class WireResult(Struct, kw_only=True):
    """An OpenAI-compatible upstream's answer that only OpenAI's own surface serves (a text
    completion, generated images): its JSON as it came, passed on byte for byte, and what it
    used. For images, `usage.completion_tokens` counts the images (one unit each, priced per
    image by the deployment)."""

    wire: bytes
    usage: Usage
    usage_estimated: bool = False
    receipt: bytes | None = None


class ChatResult(Struct, kw_only=True):
    """A complete answer and its token usage; from an upstream that signs what it charged
    (another aihub node), its receipt too.

    The answer is typed (`completion`), or, from an OpenAI-compatible upstream, the JSON it
    sent (`wire`), passed on untouched to an OpenAI client; `chat_completion()` has it typed
    either way. An upstream that was sent the call's `native` request answers in the client's
    own API instead (`native`: its JSON as it came, which only that ingress reads).

    `stop_sequence` is the client's stop sequence that ended the answer (choice 0), when the
    upstream said which (Anthropic does; so does vLLM, as a choice's `stop_reason`).
    """

    completion: ChatCompletion | None = None
    wire: bytes | None = None
    native: bytes | None = None
    usage: Usage
    usage_estimated: bool = False
    receipt: bytes | None = None
    stop_sequence: str | None = None

    def chat_completion(self) -> ChatCompletion:
        if self.completion is None:
            self.completion = _decode_wire(self.wire, ChatCompletion)
        return self.completion


class EmbedResult(Struct, kw_only=True):
    """Embeddings and their usage: typed (`embeddings`), or an OpenAI-compatible upstream's
    JSON (`wire`); `embedding_list()` has them typed either way."""

    embeddings: EmbeddingList | None = None
    wire: bytes | None = None
    usage: Usage
    usage_estimated: bool = False
    receipt: bytes | None = None

    def embedding_list(self) -> EmbeddingList:
        if self.embeddings is None:
            self.embeddings = _decode_wire(self.wire, EmbeddingList)
        return self.embeddings


def _decode_wire(wire: bytes | None, kind: type[_T]) -> _T:
    """An upstream's answer, typed: a shape we cannot read is the upstream's fault (502)."""
    try:
        return msgspec.json.decode(wire or b"", type=kind)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise UpstreamError(502, f"upstream sent an answer that is not OpenAI's: {exc}") from exc


class ChatStream(Protocol):
    """An upstream stream, opened: the status was good when `open_stream` returned.

    Iterating yields the answer's events (`adapters.events.Event`): neutral events, or from an
    OpenAI-compatible upstream its chunks as they came (`OpenAIChunk`), without the closing
    `data: [DONE]`, which the ingress writes itself; or, for a call's `native` request, the
    upstream's own events (`NativeEvent`), its closing ones included. Every other event is one
    chunk of OpenAI's stream, as the OpenAI ingress renders it. A final `UsageReport` is
    yielded only when the client asked for it (`stream_options.include_usage`); either way
    `usage` holds the totals once the stream is exhausted, and `usage_estimated` says whether
    they were counted by the upstream or estimated. An upstream that fails mid-stream raises
    `UpstreamError` from the iteration.
    """

    usage: Usage | None
    usage_estimated: bool
    # A signed receipt the upstream sent as an event of its own (another aihub node), once
    # the stream is exhausted; never passed to the client.
    receipt: bytes | None

    def __aiter__(self) -> AsyncIterator[Event]: ...

    async def aclose(self) -> None: ...


class Adapter(Protocol):
    upstream: Upstream

    async def chat(self, call: ChatCall) -> ChatResult: ...

    async def open_stream(self, call: ChatCall) -> ChatStream: ...

    async def embed(self, call: EmbedCall) -> EmbedResult: ...

    # OpenAI-compatible upstreams only; the others raise `does_not_serve`.
    async def complete(self, call: CompletionCall) -> WireResult: ...

    async def images(self, call: ImageCall) -> WireResult: ...


@runtime_checkable
class CompletionStreamer(Protocol):
    """An adapter that also streams legacy text completions (the OpenAI-compatible ones):
    `open_completion_stream` yields the upstream's `text_completion` chunks as `OpenAIChunk`s.
    Apart from the `Adapter` contract, so that an adapter that serves no completions need not
    say so."""

    async def open_completion_stream(self, call: CompletionCall) -> ChatStream: ...


def does_not_serve(provider: str, what: str) -> UpstreamError:
    """The request's own fault, answered at once: no deployment of this provider serves it
    (the config refuses such a deployment; this guards a call that slips by)."""
    return UpstreamError(
        400,
        f"The {provider} provider does not serve {what}",
        type="invalid_request_error",
        code="model_not_supported",
    )


# --- errors -------------------------------------------------------------------------------


class UpstreamError(Exception):
    """A provider refused or failed a call, already translated to OpenAI's error vocabulary.

    `status` is the status the client should see if no fallback helps: the provider's own 4xx
    for a request the provider found invalid (400, 404, 413, 422), 429 for rate limits, and
    502/503/504 for provider trouble, including a bad provider key (never the client's fault).
    `retryable` marks 429, 5xx, timeouts and connection errors; `retry_after` is the
    provider's `Retry-After` in seconds, if it sent one.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "upstream_error",
        code: str | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
        upstream_status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.retryable = retryable
        # Whoever built the error, a wait from an upstream is only ever used clamped.
        self.retry_after = sane_wait(retry_after)
        self.upstream_status = upstream_status


def sse_event(payload: bytes) -> bytes:
    """Frame one JSON payload as an SSE `data:` event."""
    return b"data: " + payload + b"\n\n"


def error_status_for(upstream_status: int) -> tuple[int, bool]:
    """Map a provider's HTTP status to (status for our client, retryable)."""
    if upstream_status == 429:
        return 429, True
    if upstream_status in (408, 504):
        return 504, True
    if upstream_status >= 500:
        return 502, True
    if upstream_status in (401, 403):
        # Our provider credentials are wrong: the gateway's fault, not the client's.
        return 502, False
    if upstream_status in (400, 404, 409, 413, 422):
        return upstream_status, False
    return 502, False


# The longest wait an upstream's Retry-After can impose (on a retry or a cooldown); anything
# beyond is the same as an hour, and an hour is already "move on to another deployment".
MAX_RETRY_AFTER = 3600.0
# Headers are untrusted text: bound what is looked at before any parsing.
_MAX_HEADER_VALUE = 64
_DELAY_SECONDS = re.compile(r"\d{1,12}(?:\.\d{1,9})?")


def sane_wait(seconds: float | None) -> float | None:
    """A wait in seconds that every caller can use as is: finite, in [0, MAX_RETRY_AFTER]."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, MAX_RETRY_AFTER)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from an untrusted `Retry-After` (RFC 9110 §10.2.3): delay-seconds (a
    decimal fraction is tolerated) or an HTTP-date, clamped to [0, MAX_RETRY_AFTER]; None for
    anything else (`inf`, `1e400`, `-5`, `nan`, garbage), as if the header were absent."""
    if not value or len(value) > _MAX_HEADER_VALUE:
        return None
    text = value.strip()
    if _DELAY_SECONDS.fullmatch(text):
        return sane_wait(float(text))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": an HTTP-date is always UTC
        when = when.replace(tzinfo=UTC)
    seconds = when.timestamp() - (time.time() if now is None else now)
    return sane_wait(max(0.0, seconds))


def parse_retry_after_ms(value: str | None) -> float | None:
    """OpenAI's `retry-after-ms` (milliseconds, as its own SDKs read it), in seconds."""
    if not value or len(value) > _MAX_HEADER_VALUE or not _DELAY_SECONDS.fullmatch(value.strip()):
        return None
    return sane_wait(float(value) / 1000)


def encode_embedding(vector: list[float], encoding_format: str) -> list[float] | str:
    """OpenAI's two encodings of a vector: a JSON list, or base64 of little-endian float32."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector
