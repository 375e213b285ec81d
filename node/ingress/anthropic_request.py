"""Anthropic's Messages request, decoded and translated into the gateway's OpenAI-shaped call.

The pipeline and the adapters speak one internal request (`ChatRequest`, OpenAI's chat
format): a Messages request is translated into it once, here, and every deployment serves it
as it serves a chat completion. What maps and how:

- `system` (a string or text blocks) is the first message, of role `system`; a message of
  role `system` among the turns (Claude Code sends one) is a `system` message there;
- a user turn's `tool_result` blocks become `tool` messages (first: OpenAI wants them right
  after the assistant's calls), its text and `image` blocks one user message of parts (an
  image's base64 source as a `data:` URL);
- an assistant turn's text is its content, its `tool_use` blocks its `tool_calls` (the
  `input` object as the JSON string of arguments OpenAI carries);
- `tools` are functions (`input_schema` is the parameters' schema), `tool_choice`
  `auto`/`any`/`tool`/`none` is `auto`/`required`/the named function/`none`, and
  `disable_parallel_tool_use` is `parallel_tool_calls: false`;
- `stop_sequences` is `stop`, `metadata.user_id` is `user`, `max_tokens` stays itself;
- a `document` block is a text part (its title, then its text) for a plain-text document, a
  `file` part for a base64 one (a PDF), and its URL as text for one Anthropic would fetch.

What OpenAI's format has no place for is dropped: `top_k`, `thinking` (and the `thinking`
blocks a client sends back), a tool result's `is_error`, `cache_control`, citations. An
Anthropic deployment reads none of this translation: it is sent the client's own body
(`node/ingress/anthropic.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Raw, Struct

from adapters.anthropic_blocks import Base64Source, ImageBlock, TextBlock, UrlSource
from adapters.types import (
    ChatRequest,
    ContentPart,
    FunctionCall,
    FunctionDef,
    ImageUrl,
    Message,
    ModelName,
    NamedFunction,
    NamedToolChoice,
    PositiveInt,
    StreamOptions,
    Tool,
    ToolCall,
    ToolChoice,
)
from node.ingress.errors import ApiError


class ToolUseBlock(Struct, tag_field="type", tag="tool_use"):
    id: str
    name: str
    input: dict[str, Any] = {}


class ToolResultBlock(Struct, tag_field="type", tag="tool_result"):
    tool_use_id: str
    # Blocks of any type (text, images, search results, documents): only text is read.
    content: str | list[Raw] = ""
    is_error: bool = False


class ThinkingBlock(Struct, tag_field="type", tag="thinking"):
    thinking: str = ""
    signature: str = ""


class RedactedThinkingBlock(Struct, tag_field="type", tag="redacted_thinking"):
    data: str = ""


class DocumentBlock(Struct, tag_field="type", tag="document"):
    """A document to read (and cite, with `citations`): its source is Anthropic's to judge
    (plain text, base64 PDF, a URL, content blocks), so it is kept as sent."""

    source: dict[str, Any]
    title: str | None = None


Block = (
    TextBlock
    | ImageBlock
    | DocumentBlock
    | ToolUseBlock
    | ToolResultBlock
    | ThinkingBlock
    | RedactedThinkingBlock
)


class InputMessage(Struct):
    # `system` mid-conversation: Claude Code sends its environment so, after the first turn.
    role: Literal["user", "assistant", "system"]
    # Each block is decoded by its type (`blocks_of`): a type this node does not translate
    # (server tool use and results, search results, what Anthropic adds next) is no error.
    content: str | list[Raw]


class _BlockType(Struct):
    type: str


_block_type = msgspec.json.Decoder(_BlockType)
_block_decoders: dict[str, msgspec.json.Decoder[Any]] = {
    kind.__struct_config__.tag: msgspec.json.Decoder(kind)  # type: ignore[attr-defined]
    for kind in (
        TextBlock,
        ImageBlock,
        DocumentBlock,
        ToolUseBlock,
        ToolResultBlock,
        ThinkingBlock,
        RedactedThinkingBlock,
    )
}


def blocks_of(content: list[Raw], where: str) -> list[Block]:
    """A turn's blocks, typed; those of a type chat has no place for are left out (an
    Anthropic deployment gets them all, in the client's own body). A block that is not what
    its type says is the client's 400, named by where it is."""
    blocks: list[Block] = []
    for index, raw in enumerate(content):
        try:
            decoder = _block_decoders.get(_block_type.decode(raw).type)
            if decoder is not None:
                blocks.append(decoder.decode(raw))
        except msgspec.ValidationError as exc:
            message, _, at = str(exc).partition(" - at `$")
            param = f"{where}[{index}]{at.rstrip('`')}"
            raise ApiError(400, f"Invalid request: {message}", param=param) from exc
    return blocks


class ToolDefinition(Struct):
    name: Annotated[str, Meta(min_length=1, max_length=128)]
    description: str | None = None
    input_schema: dict[str, Any] = msgspec.field(default_factory=lambda: {"type": "object"})


class MessagesToolChoice(Struct):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None

    def __post_init__(self) -> None:
        if self.type == "tool" and not self.name:
            raise ValueError("a `tool` choice names its tool (`name`)")


class Metadata(Struct):
    user_id: str | None = None


class ThinkingConfig(Struct):
    type: str
    budget_tokens: int | None = None


class MessagesRequest(Struct):
    """The fields of a Messages request that the gateway reads or translates."""

    model: ModelName
    max_tokens: PositiveInt
    messages: Annotated[list[InputMessage], Meta(min_length=1)]
    system: str | list[TextBlock] | None = None
    stop_sequences: Annotated[list[str], Meta(max_length=16)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=1)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    top_k: Annotated[int, Meta(ge=0)] | None = None
    metadata: Metadata | None = None
    stream: bool = False
    tools: list[ToolDefinition] | None = None
    tool_choice: MessagesToolChoice | None = None
    thinking: ThinkingConfig | None = None


class CountTokensRequest(Struct):
    """`/v1/messages/count_tokens`: a Messages request without its output settings."""

    model: ModelName
    messages: Annotated[list[InputMessage], Meta(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: MessagesToolChoice | None = None


_encode = msgspec.json.Encoder().encode


def chat_request(request: MessagesRequest | CountTokensRequest) -> ChatRequest:
    """The Messages request as the gateway's chat request; 400 for a block that is not what
    its type says."""
    messages = _system(request.system)
    for index, message in enumerate(request.messages):
        content = message.content
        if not isinstance(content, str):
            content = blocks_of(content, f"messages[{index}].content")
        messages += _TURNS[message.role](content)
    tools = [_tool(tool) for tool in request.tools] if request.tools else None
    choice = request.tool_choice
    chat = ChatRequest(
        model=request.model,
        messages=messages,
        tools=tools,
        tool_choice=_tool_choice(choice) if choice else None,
        parallel_tool_calls=False if choice and choice.disable_parallel_tool_use else None,
    )
    if isinstance(request, MessagesRequest):
        chat.max_tokens = request.max_tokens
        chat.stop = request.stop_sequences or None
        chat.temperature = request.temperature
        chat.top_p = request.top_p
        chat.user = request.metadata.user_id if request.metadata else None
        chat.stream = request.stream
        # The usage closes Anthropic's stream (`message_delta`): always asked for.
        chat.stream_options = StreamOptions(include_usage=True) if request.stream else None
    return chat


def _system(system: str | list[TextBlock] | None) -> list[Message]:
    if system is None:
        return []
    text = system if isinstance(system, str) else "".join(block.text for block in system)
    return [Message(role="system", content=text)]


def _system_turn(content: str | list[Block]) -> list[Message]:
    """A system message among the turns: its text, as a chat `system` message."""
    text = content if isinstance(content, str) else "".join(_texts(content))
    return [Message(role="system", content=text)]


def _texts(blocks: list[Block]) -> list[str]:
    return [block.text for block in blocks if isinstance(block, TextBlock)]


def _user(content: str | list[Block]) -> list[Message]:
    """A user turn: its tool results first (each a `tool` message), then its text and
    images."""
    if isinstance(content, str):
        return [Message(role="user", content=content)]
    messages = [
        Message(role="tool", content=_result_text(block), tool_call_id=block.tool_use_id)
        for block in content
        if isinstance(block, ToolResultBlock)
    ]
    parts = [part for block in content if (part := _part(block)) is not None]
    if parts:
        messages.append(Message(role="user", content=parts))
    return messages


def _part(block: Block) -> ContentPart | None:
    if isinstance(block, TextBlock):
        return ContentPart(type="text", text=block.text)
    if isinstance(block, ImageBlock):
        return ContentPart(type="image_url", image_url=ImageUrl(_image_url(block.source)))
    if isinstance(block, DocumentBlock):
        return _document(block)
    return None  # tool results are messages of their own; thinking has no place


def _document(block: DocumentBlock) -> ContentPart:
    """A document as chat reads one: its text, a file, or where it is."""
    source = block.source
    kind, data = source.get("type"), source.get("data")
    title = f"{block.title}\n\n" if block.title else ""
    if kind == "text" and isinstance(data, str):
        return ContentPart(type="text", text=title + data)
    if kind == "base64" and isinstance(data, str):
        media_type = source.get("media_type", "application/pdf")
        file = {
            "filename": block.title or "document",
            "file_data": f"data:{media_type};base64,{data}",
        }
        return ContentPart(type="file", file=file)
    return ContentPart(type="text", text=title + str(source.get("url", "")))


def _image_url(source: Base64Source | UrlSource) -> str:
    if isinstance(source, UrlSource):
        return source.url
    return f"data:{source.media_type};base64,{source.data}"


def _result_text(block: ToolResultBlock) -> str:
    if isinstance(block.content, str):
        return block.content
    return "".join(_texts(blocks_of(block.content, "tool_result.content")))


def _assistant(content: str | list[Block]) -> list[Message]:
    if isinstance(content, str):
        return [Message(role="assistant", content=content)]
    text = "".join(_texts(content))
    calls = [
        ToolCall(FunctionCall(block.name, _encode(block.input).decode()), id=block.id)
        for block in content
        if isinstance(block, ToolUseBlock)
    ]
    return [Message(role="assistant", content=text or None, tool_calls=calls or None)]


_TURNS: dict[str, Callable[[str | list[Block]], list[Message]]] = {
    "user": _user,
    "assistant": _assistant,
    "system": _system_turn,
}


def _tool(tool: ToolDefinition) -> Tool:
    return Tool(FunctionDef(tool.name, tool.description, tool.input_schema))


def _tool_choice(choice: MessagesToolChoice) -> ToolChoice:
    if choice.type == "tool" and choice.name:  # always named (`__post_init__`)
        return NamedToolChoice(NamedFunction(choice.name))
    return {"auto": "auto", "any": "required", "none": "none"}.get(choice.type, "auto")  # type: ignore[return-value]
