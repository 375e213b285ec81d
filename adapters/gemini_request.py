"""OpenAI's chat request as the Gemini API's `generateContent` body (`adapters.gemini_wire`),
which Vertex AI takes too.

- System (and `developer`) messages become `systemInstruction`; the rest are `contents` with
  roles `user` and `model`, each a list of `parts`, consecutive contents of one role merged
  (so that the answers to parallel calls travel together, as Gemini wants them).
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

What Gemini cannot take is refused before sending, as the client's 400; fields it has no
place for (`user`, `parallel_tool_calls`, logprobs, …) are dropped.
"""

from __future__ import annotations

import base64
import binascii
import mimetypes
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

import msgspec
from msgspec import Raw

from adapters.anthropic import max_tokens_for
from adapters.gemini_wire import (
    Blob,
    Content,
    FileRef,
    FunctionCall,
    FunctionCallingConfig,
    FunctionDeclaration,
    FunctionResponse,
    GenerateContentRequest,
    GenerationConfig,
    Part,
    Tool,
    ToolConfig,
)
from adapters.types import (
    ChatCall,
    ChatRequest,
    ContentPart,
    Message,
    NamedToolChoice,
    ToolCall,
    Upstream,
    UpstreamError,
)

_object_decoder = msgspec.json.Decoder(dict[str, Any])


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
