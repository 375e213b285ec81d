"""AWS Bedrock's Converse and ConverseStream wire types (API version 2023-09-30), as msgspec
Structs.

A Converse union (a content block, a tool choice, a stream event's delta) is an object with
exactly one member set; here each is one Struct whose members are all optional and omitted when
unset, so that encoding writes the one member given and decoding reads the ones this gateway
knows, ignoring members AWS adds later (reasoning, citations, guard content, …). Field names are
AWS's camelCase (`rename="camel"`).

Everything decoded here comes from an upstream and is untrusted: token counts are kept `Raw`
and read by `adapters.tokens.token_count`; a stream event's payload is one loose Struct for
every event type, so that a new member never fails a decode.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import Raw, Struct

from adapters.tokens import NO_COUNT

# --- the request --------------------------------------------------------------------------


class _Wire(Struct, rename="camel", omit_defaults=True):
    """The base of every request type: camelCase names, unset members left out."""


class ImageSource(_Wire):
    # Base64 text of the image (AWS's `bytes` blob), sent as the client's data URL had it.
    data: str = msgspec.field(name="bytes")


class ImageBlock(_Wire):
    format: str
    source: ImageSource


class ToolUseBlock(_Wire):
    tool_use_id: str
    name: str
    # The client's JSON text goes out as it came, once checked to be an object.
    input: Raw


class ToolResultContent(_Wire):
    text: str


class ToolResultBlock(_Wire):
    tool_use_id: str
    content: list[ToolResultContent]


class ContentBlock(_Wire):
    """One block of a message: exactly one member is set."""

    text: str | None = None
    image: ImageBlock | None = None
    tool_use: ToolUseBlock | None = None
    tool_result: ToolResultBlock | None = None


class Message(_Wire):
    role: str
    content: list[ContentBlock]


class SystemBlock(_Wire):
    text: str


class InferenceConfig(_Wire):
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    stop_sequences: list[str] | None = None


class InputSchema(_Wire):
    json: dict[str, Any]


class ToolSpec(_Wire):
    name: str
    input_schema: InputSchema
    description: str | None = None


class ToolEntry(_Wire):
    tool_spec: ToolSpec


class SpecificTool(_Wire):
    name: str


class Empty(_Wire):
    """AWS's `{}` members (`auto`, `any`)."""


class ToolChoice(_Wire):
    auto: Empty | None = None
    any: Empty | None = None
    tool: SpecificTool | None = None


class ToolConfig(_Wire):
    tools: list[ToolEntry]
    tool_choice: ToolChoice | None = None


class ConverseRequest(_Wire):
    """The body of `POST /model/{modelId}/converse` and `/converse-stream` (the model is in
    the path, not the body)."""

    messages: list[Message]
    inference_config: InferenceConfig
    system: list[SystemBlock] | None = None
    tool_config: ToolConfig | None = None


# --- answers, stream events and errors ----------------------------------------------------

_EMPTY_OBJECT = Raw(b"{}")


class _Read(Struct, rename="camel"):
    """The base of every answer type: camelCase names, unknown members ignored."""


class TokenUsage(_Read):
    # Untrusted counts, read by `token_count`. Cached prompt tokens are counted apart from
    # `inputTokens` by AWS (as by Anthropic), so the adapter adds them to the prompt.
    input_tokens: Raw = NO_COUNT
    output_tokens: Raw = NO_COUNT
    cache_read_input_tokens: Raw = NO_COUNT
    cache_write_input_tokens: Raw = NO_COUNT


class AnswerToolUse(_Read):
    tool_use_id: str = ""
    name: str = ""
    input: Raw = _EMPTY_OBJECT


class AnswerBlock(_Read):
    text: str | None = None
    tool_use: AnswerToolUse | None = None


class AnswerMessage(_Read):
    content: list[AnswerBlock] = []


class Output(_Read):
    message: AnswerMessage | None = None


class ConverseResponse(_Read):
    output: Output = msgspec.field(default_factory=Output)
    stop_reason: str | None = None
    usage: TokenUsage | None = None


class ToolUseStart(_Read):
    tool_use_id: str = ""
    name: str = ""


class BlockStart(_Read):
    tool_use: ToolUseStart | None = None


class ToolUseDelta(_Read):
    input: str = ""


class BlockDelta(_Read):
    text: str | None = None
    tool_use: ToolUseDelta | None = None


class StreamPayload(_Read):
    """The JSON payload of any ConverseStream event; the frame's `:event-type` header says
    which members it carries (`messageStart`: role; `contentBlockStart`: index, start;
    `contentBlockDelta`: index, delta; `contentBlockStop`: index; `messageStop`: stopReason;
    `metadata`: usage; an exception: message)."""

    content_block_index: int = 0
    start: BlockStart | None = None
    delta: BlockDelta | None = None
    stop_reason: str | None = None
    usage: TokenUsage | None = None
    message: str | None = None


class ErrorBody(Struct):
    """AWS's error body: `{"message": …}` (some services capitalise it)."""

    message: str | None = None
    Message: str | None = None


request_encoder = msgspec.json.Encoder()
response_decoder = msgspec.json.Decoder(ConverseResponse)
payload_decoder = msgspec.json.Decoder(StreamPayload)
error_decoder = msgspec.json.Decoder(ErrorBody)
