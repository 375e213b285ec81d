"""A Responses API request as the chat call every adapter takes.

Upstreams speak chat completions (an OpenAI-compatible one gets them as they are), so a
request's `instructions` and `input` items become chat messages, its function tools chat
tools, `text.format` the `response_format`, `max_output_tokens` the output cap. The raw
fields an OpenAI-compatible upstream receives are those of this chat form, never the
Responses body (which no chat endpoint would read).
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import Raw

from adapters.types import (
    ChatCall,
    ChatRequest,
    ContentPart,
    FunctionCall,
    FunctionDef,
    ImageUrl,
    Message,
    NamedToolChoice,
    ResponseFormat,
    StreamOptions,
    Tool,
    ToolCall,
    ToolChoice,
)
from adapters.types import NamedFunction as ChatNamedFunction
from node.ingress.errors import ApiError
from node.ingress.responses_wire import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionTool,
    InputImage,
    InputItem,
    InputPart,
    InputText,
    MessageItem,
    NamedFunction,
    OutputText,
    RefusalPart,
    ResponsesRequest,
    TextConfig,
    TextFormatJsonObject,
    TextFormatJsonSchema,
    input_item,
    translatable,
)

_encode = msgspec.json.encode
_raw_fields = msgspec.json.Decoder(dict[str, Raw])


def chat_call(
    request: ResponsesRequest,
    earlier: list[Raw],
    inputs: list[Raw],
    request_id: str,
    *,
    lenient: bool = False,
) -> ChatCall:
    """The chat call a Responses request asks for: its instructions, the `earlier` items of
    the conversation (those a `previous_response_id` names), then its `inputs`; 400 for what
    cannot be translated. `lenient` (the model has a deployment that speaks the Responses API
    itself, which reads the client's own items) leaves out input items of types chat has no
    place for (reasoning items, say) instead of refusing them."""
    messages = _messages(request.instructions, earlier, inputs, lenient)
    if not messages:
        raise ApiError(400, "The request has no input: send `input`", param="input")
    chat = ChatRequest(
        model=request.model,
        messages=messages,
        stream=request.stream,
        # A stream's last event carries its usage: ask every adapter for it.
        stream_options=StreamOptions(include_usage=True) if request.stream else None,
        # `max_tokens`, which every OpenAI-compatible server reads, where `max_completion_tokens`
        # is OpenAI's own alone.
        max_tokens=request.max_output_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        user=request.user,
        tools=[_tool(tool) for tool in request.function_tools()] or None,
        tool_choice=_tool_choice(request.tool_choice),
        parallel_tool_calls=request.parallel_tool_calls,
        response_format=_response_format(request.text),
    )
    raw = _raw_fields.decode(_encode(chat))
    if chat.tools:
        # `Tool` leaves out its default `type`, which an upstream requires.
        tools = [{"type": "function", "function": tool.function} for tool in chat.tools]
        raw["tools"] = Raw(_encode(tools))
    if request.reasoning is not None and request.reasoning.effort is not None:
        raw["reasoning_effort"] = Raw(_encode(request.reasoning.effort))
    return ChatCall(chat, raw, request_id)


def input_items(request: ResponsesRequest) -> list[Raw]:
    """The request's input as items: a string is one user message."""
    if isinstance(request.input, str):
        return [Raw(_encode({"type": "message", "role": "user", "content": request.input}))]
    return request.input


def _messages(
    instructions: str | None, earlier: list[Raw], inputs: list[Raw], lenient: bool
) -> list[Message]:
    messages: list[Message] = []
    if instructions:
        messages.append(Message(role="system", content=instructions))
    for raw in earlier:  # items this node kept (an upstream's own output among them)
        item = _earlier_item(raw)
        if item is not None:
            _append(messages, item)
    for index, raw in enumerate(inputs):
        if lenient and not translatable(raw):
            continue
        _append(messages, _decode_item(raw, index))
    return messages


def _earlier_item(raw: Raw) -> InputItem | None:
    """An item of the conversation so far, or None for one chat has no place for (a
    reasoning item a Responses upstream wrote: chat models do not read them back)."""
    try:
        return input_item(raw)
    except msgspec.ValidationError:
        return None


def _decode_item(raw: Raw, index: int) -> InputItem:
    try:
        return input_item(raw)
    except msgspec.ValidationError as exc:
        message = str(exc)
        where = message.rsplit(" - at `$", 1)
        path = f"input[{index}]" + (where[1].rstrip("`") if len(where) == 2 else "")
        raise ApiError(400, f"Invalid request: {where[0]}", param=path) from exc
    except msgspec.DecodeError as exc:  # pragma: no cover - the body parsed as JSON already
        raise ApiError(400, f"Invalid request: {exc}", param=f"input[{index}]") from exc


def _append(messages: list[Message], item: InputItem) -> None:
    """Add one input item to the chat: a function call joins the assistant's turn before it
    (parallel calls are one chat message), its output is a tool message."""
    if isinstance(item, MessageItem):
        messages.append(_message(item))
    elif isinstance(item, FunctionCallItem):
        call = ToolCall(FunctionCall(item.name, item.arguments), id=item.call_id)
        last = messages[-1] if messages else None
        if last is not None and last.role == "assistant":
            last.tool_calls = [*(last.tool_calls or []), call]
        else:
            messages.append(Message(role="assistant", tool_calls=[call]))
    else:
        assert isinstance(item, FunctionCallOutputItem)
        output = item.output if isinstance(item.output, str) else _text(item.output)
        messages.append(Message(role="tool", content=output, tool_call_id=item.call_id))


def _message(item: MessageItem) -> Message:
    if isinstance(item.content, str):
        return Message(role=item.role, content=item.content)
    if item.role == "assistant":
        # An earlier answer: chat's assistant content is its text, its refusal apart.
        refusal = "".join(p.refusal for p in item.content if isinstance(p, RefusalPart))
        return Message(role="assistant", content=_text(item.content), refusal=refusal or None)
    return Message(role=item.role, content=[_part(part) for part in item.content])


def _part(part: InputPart) -> ContentPart:
    if isinstance(part, InputText | OutputText):
        return ContentPart(type="text", text=part.text)
    if isinstance(part, InputImage):
        if part.image_url is None:
            raise ApiError(400, "An `input_image` needs an `image_url`", param="input")
        return ContentPart(type="image_url", image_url=ImageUrl(part.image_url, part.detail))
    raise ApiError(400, "A `refusal` part belongs to an assistant message", param="input")


def _text(parts: list[InputPart]) -> str:
    return "".join(p.text for p in parts if isinstance(p, InputText | OutputText))


def _tool(tool: FunctionTool) -> Tool:
    function = FunctionDef(tool.name, tool.description, tool.parameters, tool.strict)
    return Tool(function)


def _tool_choice(choice: str | NamedFunction | None) -> ToolChoice | None:
    if isinstance(choice, NamedFunction):
        return NamedToolChoice(ChatNamedFunction(choice.name))
    return choice  # type: ignore[return-value]  # "none" | "auto" | "required" | None


def _response_format(text: TextConfig | None) -> ResponseFormat | None:
    if text is None:
        return None
    format_ = text.format
    if isinstance(format_, TextFormatJsonObject):
        return ResponseFormat(type="json_object")
    if isinstance(format_, TextFormatJsonSchema):
        schema: dict[str, Any] = {"name": format_.name, "schema": format_.schema}
        if format_.description is not None:
            schema["description"] = format_.description
        if format_.strict is not None:
            schema["strict"] = format_.strict
        return ResponseFormat(type="json_schema", json_schema=schema)
    return None  # plain text: chat's default
