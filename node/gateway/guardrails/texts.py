"""Where a request's and an answer's texts are, and how found literals are replaced in them.

A chat request is read in its typed form (every surface decodes into it: a Messages or
Responses request's system prompt and instructions are its system message); what is found is
replaced in that form, in the raw fields an OpenAI-compatible upstream is sent and in a native
request, so that no upstream sees it, whichever form it is sent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from adapters.types import ChatCall, ChatRequest, ChatResult, CompletionCall, WireResult
from node.errors import HubError, Kind
from node.gateway.guardrails.findings import Replacer

# The top-level fields of a request that hold what the client wrote (every other field is
# parameters, passed on as they are).
_TEXT_FIELDS = frozenset({"messages", "input", "prompt", "system", "instructions", "suffix"})


def chat_texts(request: ChatRequest) -> list[str]:
    texts: list[str] = []
    for message in request.messages:
        if isinstance(message.content, str):
            texts.append(message.content)
        elif message.content:
            texts.extend(part.text for part in message.content if part.text)
        for tool_call in message.tool_calls or ():
            if tool_call.function.arguments:
                texts.append(tool_call.function.arguments)
    return texts


def call_texts(call: ChatCall | CompletionCall) -> list[str]:
    if isinstance(call, ChatCall):
        return chat_texts(call.request)
    prompt, texts = call.request.prompt, []
    if isinstance(prompt, str):
        texts.append(prompt)
    else:  # a batch of prompts (strings), or of token ids (nothing to read)
        texts.extend(item for item in prompt if isinstance(item, str))
    return texts


def replaced(value: Any, replace: Callable[[str], str]) -> Any:
    """`value` (decoded JSON) with `replace` applied to every string in it, in place where it
    is a container. Iterative: a hostile nesting depth costs no recursion."""
    if isinstance(value, str):
        return replace(value)
    stack = [value]
    while stack:
        node = stack.pop()
        pairs = node.items() if isinstance(node, dict) else enumerate(node)
        for key, item in list(pairs):
            if isinstance(item, str):
                node[key] = replace(item)
            elif isinstance(item, dict | list):
                stack.append(item)
    return value


def _raw_fields(
    fields: dict[str, msgspec.Raw], replace: Callable[[str], str]
) -> dict[str, msgspec.Raw]:
    out = dict(fields)
    for name in _TEXT_FIELDS.intersection(fields):
        try:
            value = msgspec.json.decode(fields[name])
        except (msgspec.DecodeError, RecursionError):
            # Never passed on unredacted: a field the node cannot read is refused.
            message = f"`{name}` is nested too deeply to be checked"
            raise HubError(Kind.INVALID_REQUEST, message, param=name) from None
        out[name] = msgspec.Raw(msgspec.json.encode(replaced(value, replace)))
    return out


def rewrite_call(call: ChatCall | CompletionCall, replace: Callable[[str], str]) -> None:
    """Replace what was found everywhere the call holds the client's texts."""
    typed = replaced(msgspec.to_builtins(call.request), replace)
    call.request = msgspec.convert(typed, type(call.request))  # type: ignore[assignment]
    call.raw = _raw_fields(call.raw, replace)
    if isinstance(call, ChatCall) and call.native is not None:
        call.native.fields = _raw_fields(call.native.fields, replace)


def _choice_texts(document: Any) -> list[str]:
    texts: list[str] = []
    choices = document.get("choices") if isinstance(document, dict) else None
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else choice.get("text")
        if isinstance(content, str):
            texts.append(content)
    return texts


def result_texts(result: ChatResult | WireResult) -> tuple[list[str], Any]:
    """An answer's texts, and its decoded form (to replace in), or None if it has none."""
    if isinstance(result, ChatResult) and result.completion is not None:
        document = msgspec.to_builtins(result.completion)
    elif result.wire is not None:
        try:
            document = msgspec.json.decode(result.wire)
        except (msgspec.DecodeError, RecursionError):
            return [], None
    else:
        return [], None
    return _choice_texts(document), document


def rewrite_result(
    result: ChatResult | WireResult, document: Any, replace: Replacer
) -> ChatResult | WireResult:
    replaced(document, replace)
    if isinstance(result, ChatResult) and result.completion is not None:
        completion = msgspec.convert(document, type(result.completion))
        return msgspec.structs.replace(result, completion=completion)
    return msgspec.structs.replace(result, wire=msgspec.json.encode(document))


def redacted_json(body: bytes, replace: Callable[[str], str]) -> bytes:
    """A JSON body (one the node decoded already, under its nesting bound) with `replace`
    applied to every string in it; one that does not decode is kept as nothing rather than
    as it was."""
    try:
        value = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return b""
    return msgspec.json.encode(replaced(value, replace))
