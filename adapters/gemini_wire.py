"""Google's Gemini wire format (the Gemini API's `generateContent` family, the same body on
Vertex AI) as msgspec Structs: the request, the answer (one per SSE event when streamed), the
embeddings calls and Google's error body.

Requests are encoded strictly (camelCase, absent fields left out); answers are decoded
leniently: Google adds fields and enum values over time, so nothing unknown fails a decode, and
every token count is read as untrusted (`Raw`, through `adapters.tokens.token_count`).
Protobuf's JSON leaves out a field that is zero, so an absent count in a `usageMetadata` that
is there at all means 0 (`ZERO`), except the prompt's, whose absence means no usage was sent.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import Raw, Struct

from adapters.tokens import NO_COUNT

ZERO = Raw(b"0")

# --- the request ------------------------------------------------------------------------------


class Blob(Struct, rename="camel"):
    """Bytes inline (`inlineData`): base64 text and its MIME type."""

    mime_type: str
    data: str


class FileRef(Struct, rename="camel"):
    """A file Google fetches itself (`fileData`): a Files API or `gs://` URI, or a URL."""

    mime_type: str
    file_uri: str


class FunctionCall(Struct, omit_defaults=True):
    name: str
    # The call's JSON object as the client sent it (checked to be an object first).
    args: Raw = Raw(b"{}")


class FunctionResponse(Struct):
    name: str
    response: Raw


class Part(Struct, omit_defaults=True, rename="camel"):
    """One part of a content: exactly one of its data fields is set. A model's function call
    carries the `thoughtSignature` it came with, which thinking models want back."""

    text: str | None = None
    inline_data: Blob | None = None
    file_data: FileRef | None = None
    function_call: FunctionCall | None = None
    function_response: FunctionResponse | None = None
    thought_signature: str | None = None


class Content(Struct, omit_defaults=True):
    parts: list[Part]
    role: str | None = None


class FunctionDeclaration(Struct, omit_defaults=True, rename="camel"):
    name: str
    description: str | None = None
    # Full JSON Schema (`parametersJsonSchema`), as OpenAI's tools have, not the OpenAPI
    # subset of `parameters`, which refuses e.g. `additionalProperties`.
    parameters_json_schema: dict[str, Any] | None = None


class Tool(Struct, rename="camel"):
    function_declarations: list[FunctionDeclaration]


class FunctionCallingConfig(Struct, omit_defaults=True, rename="camel"):
    mode: str
    allowed_function_names: list[str] | None = None


class ToolConfig(Struct, rename="camel"):
    function_calling_config: FunctionCallingConfig


class GenerationConfig(Struct, omit_defaults=True, rename="camel"):
    stop_sequences: list[str] | None = None
    response_mime_type: str | None = None
    # Full JSON Schema, as `response_format.json_schema` has it.
    response_json_schema: dict[str, Any] | None = None
    candidate_count: int | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class GenerateContentRequest(Struct, omit_defaults=True, rename="camel"):
    contents: list[Content]
    system_instruction: Content | None = None
    tools: list[Tool] | None = None
    tool_config: ToolConfig | None = None
    generation_config: GenerationConfig | None = None


# --- the answer -------------------------------------------------------------------------------


class AnswerFunctionCall(Struct):
    name: str = ""
    # Any JSON; an object is what Google sends (checked where it is used).
    args: Raw = Raw(b"{}")
    id: str | None = None


class AnswerPart(Struct, rename="camel"):
    """A part of the model's content; parts of kinds this gateway has no place for (code
    execution, inline images out, …) decode with every field empty and are skipped."""

    text: str | None = None
    # A thinking model's summary of its thoughts: not part of the answer.
    thought: bool = False
    function_call: AnswerFunctionCall | None = None
    thought_signature: str | None = None


class AnswerContent(Struct):
    parts: list[AnswerPart] = []
    role: str | None = None


class SafetyRating(Struct):
    category: str = ""
    probability: str = ""
    blocked: bool = False


class Candidate(Struct, rename="camel"):
    content: AnswerContent | None = None
    finish_reason: str | None = None
    # Absent for the first candidate (protobuf leaves a zero out).
    index: int = 0
    safety_ratings: list[SafetyRating] = []
    finish_message: str | None = None


class PromptFeedback(Struct, rename="camel"):
    block_reason: str | None = None
    safety_ratings: list[SafetyRating] = []
    block_reason_message: str | None = None


class UsageMetadata(Struct, rename="camel"):
    prompt_token_count: Raw = NO_COUNT
    # Included in the prompt's count already; read only to be reported.
    cached_content_token_count: Raw = ZERO
    # Tokens a tool (search, code execution) added to the prompt: billed as input.
    tool_use_prompt_token_count: Raw = ZERO
    candidates_token_count: Raw = ZERO
    # A thinking model's thoughts: billed as output, counted beside the candidates'.
    thoughts_token_count: Raw = ZERO


class ErrorDetail(Struct):
    """One of `error.details`: only RetryInfo (`retryDelay`) and ErrorInfo (`reason`) are
    read."""

    type: str = msgspec.field(default="", name="@type")
    retry_delay: str | None = msgspec.field(default=None, name="retryDelay")
    reason: str | None = None


class ErrorStatus(Struct):
    code: int = 0
    message: str = ""
    status: str = ""
    details: list[ErrorDetail] = []


class GenerateContentResponse(Struct, rename="camel"):
    candidates: list[Candidate] = []
    prompt_feedback: PromptFeedback | None = None
    usage_metadata: UsageMetadata | None = None
    model_version: str | None = None
    response_id: str | None = None
    # Not part of Google's answer type: an error sent as a stream event after the 200.
    error: ErrorStatus | None = None


class ErrorBody(Struct):
    error: ErrorStatus | None = None


# --- embeddings -------------------------------------------------------------------------------


class EmbedContentRequest(Struct, omit_defaults=True, rename="camel"):
    content: Content
    # Required inside a batch (`models/{model}`), absent on a single call.
    model: str | None = None
    output_dimensionality: int | None = None


class BatchEmbedContentsRequest(Struct):
    requests: list[EmbedContentRequest]


class ContentEmbedding(Struct):
    values: list[float] = []


class EmbedContentResponse(Struct):
    embedding: ContentEmbedding | None = None


class BatchEmbedContentsResponse(Struct):
    embeddings: list[ContentEmbedding] = []
