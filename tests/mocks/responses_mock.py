"""The OpenAI mock's Responses API (`POST /v1/responses`), in OpenAI's real wire format.

It answers `mock says: <the last user text>` (or, after a function call's output, `mock says:
<that output>`), one word per output token, cut at `max_output_tokens` (status `incomplete`,
`incomplete_details.reason: max_output_tokens`). Offered function tools (and a `tool_choice`
other than `none`), it calls the first with `{"city":"Paris"}`. With `reasoning`, a reasoning
item comes first (with `encrypted_content` when `include` asks for
`reasoning.encrypted_content`) and five reasoning tokens are counted in
`output_tokens_details`. Streamed, it sends the typed events with their `sequence_number`:
`response.created`, `response.in_progress`, per item `response.output_item.added`, its
content part, text or argument deltas and `.done` events, then `response.completed` (or
`.incomplete`); no `[DONE]`.

It keeps nothing, as OpenAI keeps nothing under `store: false`: a `previous_response_id` is
refused, and so is an input item that carries an `id` (OpenAI cannot find an item it never
kept). Hostile knobs: `usage` replaces the usage object, `padding` adds that many bytes to
one text delta.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from tests.mocks.script import Failure

_ids = itertools.count(1)


class _Tool(msgspec.Struct):
    type: str
    name: str | None = None


class _Request(msgspec.Struct):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[_Tool] | None = None
    tool_choice: Any = None
    max_output_tokens: int | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    metadata: dict[str, str] | None = None


def _error(status: int, message: str, param: str | None = None) -> Failure:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param}}
    return Failure(status, msgspec.json.encode(body))


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


@dataclass
class Answer:
    request: _Request
    output: list[dict[str, Any]]
    usage: dict[str, Any]
    status: str


def refusal(request: _Request) -> Failure | None:
    """What OpenAI refuses of a request under `store: false`."""
    if request.previous_response_id is not None:
        message = f"Previous response with id '{request.previous_response_id}' not found."
        return _error(400, message, "previous_response_id")
    for index, item in enumerate(request.input if isinstance(request.input, list) else ()):
        if "id" in item and item.get("type") != "reasoning":
            message = (
                f"Item with id '{item['id']}' not found. Items are not persisted when `store` "
                "is set to false."
            )
            return _error(404, message, f"input[{index}]")
    return None


def answer(request: _Request, usage: Any = None) -> Answer:
    items = (
        [{"role": "user", "content": request.input}]
        if isinstance(request.input, str)
        else request.input
    )
    last = items[-1] if items else {}
    output: list[dict[str, Any]] = []
    reasoning_tokens = 0
    if request.reasoning:
        reasoning_tokens = 5
        item: dict[str, Any] = {"type": "reasoning", "id": f"rs_mock{next(_ids)}", "summary": []}
        if "reasoning.encrypted_content" in (request.include or ()):
            item["encrypted_content"] = "gAAAAmock"
        output.append(item)
    functions = [tool for tool in request.tools or () if tool.type == "function"]
    answered = last.get("type") == "function_call_output"
    status = "completed"
    words: list[str] = []
    if functions and request.tool_choice != "none" and not answered:
        output.append(
            {
                "type": "function_call",
                "id": f"fc_mock{next(_ids)}",
                "call_id": "call_mock1",
                "name": functions[0].name,
                "arguments": '{"city":"Paris"}',
                "status": "completed",
            }
        )
    else:
        said = last.get("output") if answered else _text(last.get("content"))
        words = ("mock says: " + str(said)).split(" ")
        if request.max_output_tokens is not None and len(words) > request.max_output_tokens:
            words, status = words[: request.max_output_tokens], "incomplete"
        text = {"type": "output_text", "text": " ".join(words), "annotations": [], "logprobs": []}
        message = {
            "type": "message",
            "id": f"msg_mock{next(_ids)}",
            "status": status,
            "role": "assistant",
            "content": [text],
        }
        output.append(message)
    input_tokens = sum(len(_text(item.get("content")).split()) + 3 for item in items)
    output_tokens = len(words) + reasoning_tokens + (10 if not words else 0)
    counted = usage or {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": input_tokens + output_tokens,
    }
    return Answer(request, output, counted, status)


def response_object(
    answer: Answer, response_id: str, status: str, output: list[Any], usage: Any = None
) -> dict[str, Any]:
    request = answer.request
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "error": None,
        "incomplete_details": incomplete,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "model": request.model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": request.store,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": request.tool_choice or "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "metadata": request.metadata or {},
    }


def stream_events(answer: Answer, padding: int = 0) -> list[bytes]:
    """The answer as the Responses API streams it: each an SSE event named for its type."""
    response_id = f"resp_mock{next(_ids)}"
    events: list[dict[str, Any]] = []
    opening = response_object(answer, response_id, "in_progress", [])
    events.append({"type": "response.created", "response": opening})
    events.append({"type": "response.in_progress", "response": opening})
    for index, item in enumerate(answer.output):
        events += _item_events(index, item, padding)
    final = "response.incomplete" if answer.status == "incomplete" else "response.completed"
    whole = response_object(answer, response_id, answer.status, answer.output, answer.usage)
    events.append({"type": final, "response": whole})
    framed = []
    for number, event in enumerate(events):
        data = msgspec.json.encode({**event, "sequence_number": number})
        framed.append(b"event: " + event["type"].encode() + b"\ndata: " + data + b"\n\n")
    return framed


def _item_events(index: int, item: dict[str, Any], padding: int) -> list[dict[str, Any]]:
    kind = item["type"]
    if kind == "reasoning":
        return [
            {"type": "response.output_item.added", "output_index": index, "item": item},
            {"type": "response.output_item.done", "output_index": index, "item": item},
        ]
    where = {"item_id": item["id"], "output_index": index}
    if kind == "function_call":
        opened = {**item, "arguments": "", "status": "in_progress"}
        pieces = ['{"city"', ':"Paris"}']
        return [
            {"type": "response.output_item.added", "output_index": index, "item": opened},
            *(
                {"type": "response.function_call_arguments.delta", **where, "delta": piece}
                for piece in pieces
            ),
            {
                "type": "response.function_call_arguments.done",
                **where,
                "arguments": item["arguments"],
            },
            {"type": "response.output_item.done", "output_index": index, "item": item},
        ]
    text = item["content"][0]["text"]
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    opened = {**item, "status": "in_progress", "content": []}
    at = {**where, "content_index": 0}
    words = text.split(" ")
    deltas = [
        {"type": "response.output_text.delta", **at, "delta": word if n == 0 else " " + word}
        for n, word in enumerate(words)
    ]
    if padding:
        deltas[0]["delta"] += "x" * padding
    return [
        {"type": "response.output_item.added", "output_index": index, "item": opened},
        {"type": "response.content_part.added", **at, "part": part},
        *deltas,
        {"type": "response.output_text.done", **at, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **at, "part": item["content"][0]},
        {"type": "response.output_item.done", "output_index": index, "item": item},
    ]


decode_request = msgspec.json.Decoder(_Request).decode
