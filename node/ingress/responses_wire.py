"""The OpenAI Responses API's wire format: the request the gateway reads, the `response`
object and the stream's events it writes.

Only what the gateway translates is typed; a request's input items are decoded one by one
(`input_item`), since OpenAI lets an "easy" message leave out its `type`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Raw, Struct

from adapters.types import ModelName, PositiveInt

# --- the request --------------------------------------------------------------------------


class InputText(Struct, tag_field="type", tag="input_text"):
    text: str


class InputImage(Struct, tag_field="type", tag="input_image"):
    image_url: str | None = None
    detail: str | None = None
    file_id: str | None = None


class OutputText(Struct, tag_field="type", tag="output_text"):
    """Text of an earlier answer, as a client hands back `response.output`."""

    text: str
    annotations: list[Any] = []


class RefusalPart(Struct, tag_field="type", tag="refusal"):
    refusal: str


InputPart = InputText | InputImage | OutputText | RefusalPart


class MessageItem(Struct, tag_field="type", tag="message"):
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputPart]
    id: str | None = None
    status: str | None = None


class FunctionCallItem(Struct, tag_field="type", tag="function_call"):
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(Struct, tag_field="type", tag="function_call_output"):
    call_id: str
    output: str | list[InputPart]
    id: str | None = None
    status: str | None = None


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem


class _ItemType(Struct):
    type: str = "message"  # an "easy" message: `{"role": …, "content": …}`


_item_type = msgspec.json.Decoder(_ItemType)
_item_decoders: dict[str, msgspec.json.Decoder[Any]] = {
    "message": msgspec.json.Decoder(MessageItem),
    "function_call": msgspec.json.Decoder(FunctionCallItem),
    "function_call_output": msgspec.json.Decoder(FunctionCallOutputItem),
}


def translatable(raw: Raw) -> bool:
    """Whether an input item is of a type the chat translation reads (`input_item`)."""
    try:
        return _item_type.decode(raw).type in _item_decoders
    except msgspec.ValidationError:
        return True  # not even an item: `input_item` says what is wrong with it


def input_item(raw: Raw) -> InputItem:
    """One input item, typed by its `type` (a message when it has none). Raises
    `msgspec.ValidationError` for an item of a type the gateway does not translate."""
    kind = _item_type.decode(raw).type
    decoder = _item_decoders.get(kind)
    if decoder is None:
        raise msgspec.ValidationError(f"Input items of type `{kind}` are not supported - at `$`")
    if kind == "message":
        # The tag is optional on the wire, required by the Struct: add it if it is missing.
        fields = msgspec.json.decode(raw, type=dict[str, Raw])
        fields["type"] = Raw(b'"message"')
        return decoder.decode(msgspec.json.encode(fields))
    return decoder.decode(raw)


class FunctionTool(Struct, tag_field="type", tag="function", omit_defaults=True):
    name: Annotated[str, Meta(min_length=1, max_length=128)]
    parameters: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class _HostedTool(Struct, tag_field="type"):
    """A tool the gateway cannot offer through chat completions: OpenAI runs it itself (web
    search) or the client's own runtime does (Codex's shell, freeform patch and namespaced
    agent tools). Codex CLI sends them with every request; the gateway drops them, so that
    the model is offered the `function` tools alone, rather than refuse the request. Other
    hosted tools (`file_search`, `computer_use_preview`, …) are still refused: a client that
    asks for them expects them run."""


class CustomTool(_HostedTool, tag="custom"):
    pass


class LocalShellTool(_HostedTool, tag="local_shell"):
    pass


class NamespaceTool(_HostedTool, tag="namespace"):
    pass


class WebSearchTool(_HostedTool, tag="web_search"):
    pass


Tool = FunctionTool | CustomTool | LocalShellTool | NamespaceTool | WebSearchTool


class NamedFunction(Struct, tag_field="type", tag="function"):
    name: str


class TextFormatText(Struct, tag_field="type", tag="text"):
    pass


class TextFormatJsonObject(Struct, tag_field="type", tag="json_object"):
    pass


class TextFormatJsonSchema(Struct, tag_field="type", tag="json_schema", omit_defaults=True):
    name: str
    schema: dict[str, Any]
    description: str | None = None
    strict: bool | None = None


TextFormat = TextFormatText | TextFormatJsonObject | TextFormatJsonSchema


class TextConfig(Struct):
    format: TextFormat = msgspec.field(default_factory=TextFormatText)
    verbosity: str | None = None


class Reasoning(Struct, omit_defaults=True):
    effort: str | None = None
    summary: str | None = None


class ResponsesRequest(Struct, omit_defaults=True):
    """The fields of a Responses API request that the gateway reads or translates."""

    model: ModelName
    input: str | list[Raw]
    instructions: str | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: PositiveInt | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    reasoning: Reasoning | None = None
    previous_response_id: str | None = None
    user: str | None = None
    stream: bool = False

    def function_tools(self) -> list[FunctionTool]:
        """The tools the model is offered: the `function` ones (see `_HostedTool`)."""
        return [tool for tool in self.tools or [] if isinstance(tool, FunctionTool)]


# --- the response -------------------------------------------------------------------------


class OutputTextPart(Struct, tag_field="type", tag="output_text"):
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] = []


class RefusalOutputPart(Struct, tag_field="type", tag="refusal"):
    refusal: str


OutputPart = OutputTextPart | RefusalOutputPart


class OutputMessage(Struct, tag_field="type", tag="message"):
    id: str
    status: str
    content: list[OutputPart]
    role: str = "assistant"


class OutputFunctionCall(Struct, tag_field="type", tag="function_call"):
    id: str
    call_id: str
    name: str
    arguments: str
    status: str


OutputItem = OutputMessage | OutputFunctionCall


class InputTokensDetails(Struct):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(Struct):
    reasoning_tokens: int = 0


class ResponseUsage(Struct):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails = msgspec.field(default_factory=InputTokensDetails)
    output_tokens_details: OutputTokensDetails = msgspec.field(default_factory=OutputTokensDetails)


class IncompleteDetails(Struct):
    reason: str


class ResponseError(Struct):
    code: str
    message: str


class Response(Struct, tag_field="object", tag="response"):
    """The `response` object; what the request asked for is repeated, as OpenAI does."""

    id: str
    created_at: int
    status: str
    model: str
    output: list[OutputItem]
    tools: list[FunctionTool]
    tool_choice: str | NamedFunction
    parallel_tool_calls: bool
    text: TextConfig
    usage: ResponseUsage | None = None
    incomplete_details: IncompleteDetails | None = None
    error: ResponseError | None = None
    instructions: str | None = None
    metadata: dict[str, str] = {}
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    reasoning: Reasoning | None = None
    store: bool = False
    previous_response_id: str | None = None
    user: str | None = None


# --- the stream's events ------------------------------------------------------------------


class _StreamEvent(Struct, tag_field="type"):
    sequence_number: int


class ResponseSnapshot(_StreamEvent, kw_only=True):
    """`response.created`, `.in_progress`, `.completed`, `.incomplete`, `.failed`: the
    whole response as it stands."""

    response: Response


class Created(ResponseSnapshot, tag="response.created"):
    pass


class InProgress(ResponseSnapshot, tag="response.in_progress"):
    pass


class Completed(ResponseSnapshot, tag="response.completed"):
    pass


class Incomplete(ResponseSnapshot, tag="response.incomplete"):
    pass


class Failed(ResponseSnapshot, tag="response.failed"):
    pass


class ItemAdded(_StreamEvent, tag="response.output_item.added", kw_only=True):
    output_index: int
    item: OutputItem


class ItemDone(_StreamEvent, tag="response.output_item.done", kw_only=True):
    output_index: int
    item: OutputItem


class PartAdded(_StreamEvent, tag="response.content_part.added", kw_only=True):
    item_id: str
    output_index: int
    content_index: int
    part: OutputPart


class PartDone(_StreamEvent, tag="response.content_part.done", kw_only=True):
    item_id: str
    output_index: int
    content_index: int
    part: OutputPart


class TextDeltaEvent(_StreamEvent, tag="response.output_text.delta", kw_only=True):
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = []


class TextDone(_StreamEvent, tag="response.output_text.done", kw_only=True):
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = []


class RefusalDeltaEvent(_StreamEvent, tag="response.refusal.delta", kw_only=True):
    item_id: str
    output_index: int
    content_index: int
    delta: str


class RefusalDone(_StreamEvent, tag="response.refusal.done", kw_only=True):
    item_id: str
    output_index: int
    content_index: int
    refusal: str


class ArgumentsDelta(_StreamEvent, tag="response.function_call_arguments.delta", kw_only=True):
    item_id: str
    output_index: int
    delta: str


class ArgumentsDone(_StreamEvent, tag="response.function_call_arguments.done", kw_only=True):
    item_id: str
    output_index: int
    arguments: str


StreamEvent = (
    Created
    | InProgress
    | Completed
    | Incomplete
    | Failed
    | ItemAdded
    | ItemDone
    | PartAdded
    | PartDone
    | TextDeltaEvent
    | TextDone
    | RefusalDeltaEvent
    | RefusalDone
    | ArgumentsDelta
    | ArgumentsDone
)
