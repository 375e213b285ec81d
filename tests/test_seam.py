"""The typed seam between adapters and ingress: neutral stream events, the OpenAI fast path
(an upstream's bytes passed on untouched and decoded only when asked) and the OpenAI renderer."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import adapters.anthropic
from adapters.anthropic import AnthropicAdapter
from adapters.events import (
    Event,
    Finish,
    NeutralEvent,
    OpenAIChunk,
    RefusalDelta,
    Start,
    TextDelta,
    ToolCallDelta,
    ToolCallFragment,
    UsageReport,
)
from adapters.types import (
    ChatCompletion,
    ChatResult,
    Choice,
    EmbedResult,
    ResponseMessage,
    Upstream,
    UpstreamError,
    Usage,
)
from bench.seam import CannedResponse
from node.ingress.openai_render import ChunkRenderer, result_body
from tests.calls import chat_call

EVERY_EVENT: list[Event] = [
    Start("req-1", "m", 1_700_000_000),
    Start("req-1", "m", 1_700_000_000, choice=1),
    TextDelta("hello"),
    RefusalDelta("no", choice=1),
    ToolCallDelta([ToolCallFragment(0, "call_1", "get_weather", ""), ToolCallFragment(1)]),
    ToolCallDelta([ToolCallFragment(0, arguments='{"city":')]),
    Finish("tool_calls"),
    UsageReport(Usage(3, 4, 7)),
    OpenAIChunk(b'data: {"id":"x","choices":[]}\n\n'),
]


@pytest.mark.parametrize("codec", [msgspec.json, msgspec.msgpack], ids=["json", "msgpack"])
def test_every_event_round_trips_through_msgspec_as_the_union(codec: Any) -> None:
    encoded = [codec.encode(event) for event in EVERY_EVENT]
    assert [codec.decode(data, type=Event) for data in encoded] == EVERY_EVENT


def test_events_are_tagged_by_type() -> None:
    assert json.loads(msgspec.json.encode(TextDelta("hi"))) == {"type": "text", "text": "hi"}
    assert json.loads(msgspec.json.encode(Finish("stop", choice=2))) == {
        "type": "finish",
        "reason": "stop",
        "choice": 2,
    }


# --- the renderer -----------------------------------------------------------------------------


def test_an_upstream_chunk_passes_through_untouched() -> None:
    chunk = OpenAIChunk(b'data: {"id":"x","object":"chat.completion.chunk","choices":[]}\n\n')
    assert ChunkRenderer().render(chunk) is chunk.sse


def test_neutral_events_render_as_the_chunks_openai_clients_know() -> None:
    render = ChunkRenderer().render
    sent = [render(event) for event in EVERY_EVENT[:-1]]
    assert all(event.startswith(b"data: ") and event.endswith(b"\n\n") for event in sent)
    parsed = [json.loads(event[6:-2]) for event in sent]
    envelope = {"id": "req-1", "object": "chat.completion.chunk", "created": 1_700_000_000}
    assert all({**chunk, **envelope, "model": "m"} == chunk for chunk in parsed)
    assert [chunk["choices"] for chunk in parsed] == [
        [{"index": 0, "delta": {"role": "assistant", "content": ""}, **_NO_FINISH}],
        [{"index": 1, "delta": {"role": "assistant", "content": ""}, **_NO_FINISH}],
        [{"index": 0, "delta": {"content": "hello"}, **_NO_FINISH}],
        [{"index": 1, "delta": {"refusal": "no"}, **_NO_FINISH}],
        [
            {
                "index": 0,
                "delta": {
                    "tool_calls": [
                        _call({"name": "get_weather", "arguments": ""}, id="call_1", index=0),
                        _call({}, index=1),
                    ]
                },
                **_NO_FINISH,
            }
        ],
        [
            {
                "index": 0,
                "delta": {"tool_calls": [_call({"arguments": '{"city":'}, index=0)]},
                **_NO_FINISH,
            }
        ],
        [{"index": 0, "delta": {}, "finish_reason": "tool_calls", "logprobs": None}],
        [],
    ]
    assert parsed[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


_NO_FINISH = {"finish_reason": None, "logprobs": None}


def _call(function: dict[str, str], **fields: Any) -> dict[str, Any]:
    return {"type": "function", "function": function, **fields}


def test_a_typed_result_is_encoded_and_a_wire_result_sent_as_it_came() -> None:
    completion = ChatCompletion(
        "req-1", "m", [Choice(0, ResponseMessage("hi"), "stop")], Usage(1, 1, 2), created=5
    )
    typed = ChatResult(completion=completion, usage=completion.usage)
    assert result_body(typed) == msgspec.json.encode(completion)
    wire = msgspec.json.encode({**msgspec.to_builtins(completion), "system_fingerprint": "fp"})
    passed = ChatResult(wire=wire, usage=completion.usage)
    assert result_body(passed) is wire
    assert passed.chat_completion() == completion  # decoded only when asked, and once
    assert passed.chat_completion() is passed.chat_completion()
    embeddings = EmbedResult(
        wire=b'{"object":"list","data":[],"model":"e","usage":{}}', usage=Usage()
    )
    assert embeddings.embedding_list().model == "e"


def test_a_wire_answer_that_is_not_openai_s_is_the_upstream_s_fault() -> None:
    result = ChatResult(wire=b'{"choices": "nope"}', usage=Usage())
    with pytest.raises(UpstreamError) as caught:
        result.chat_completion()
    assert caught.value.status == 502


# --- decoding an upstream's chunk into neutral events, and back --------------------------------

_text = st.text(min_size=1, max_size=8)
_maybe_text = st.none() | st.text(max_size=8)
_fragment = st.builds(ToolCallFragment, st.integers(0, 3), _maybe_text, _maybe_text, _maybe_text)
_choice = st.integers(0, 3)
_neutral = st.one_of(
    st.builds(Start, st.just("chatcmpl-1"), st.just("gpt-x"), st.just(1_700_000_000), _choice),
    st.builds(TextDelta, _text, _choice),
    st.builds(RefusalDelta, _text, _choice),
    st.builds(ToolCallDelta, st.lists(_fragment, min_size=1, max_size=3), _choice),
    st.builds(Finish, st.sampled_from(["stop", "length", "tool_calls", "content_filter"]), _choice),
    st.builds(
        lambda p, c: UsageReport(Usage(p, c, p + c)), st.integers(0, 10**6), st.integers(0, 10**6)
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_neutral, max_size=12))
def test_a_rendered_event_decodes_to_itself(events: list[NeutralEvent]) -> None:
    render = ChunkRenderer().render
    render(Start("chatcmpl-1", "gpt-x", 1_700_000_000))
    for event in events:
        assert OpenAIChunk(render(event)).events() == [event]


_wire_call = st.fixed_dictionaries(
    {"index": st.integers(0, 3)},
    optional={
        "id": st.text(max_size=6),
        "type": st.just("function"),
        "function": st.fixed_dictionaries(
            {}, optional={"name": st.text(max_size=6), "arguments": st.text(max_size=8)}
        ),
    },
)
_wire_delta = st.fixed_dictionaries(
    {},
    optional={
        "role": st.just("assistant"),
        "content": st.none() | st.text(max_size=8),
        "refusal": st.none() | st.text(max_size=8),
        "tool_calls": st.lists(_wire_call, max_size=2),
    },
)
_wire_choice = st.fixed_dictionaries(
    {
        "index": st.integers(0, 2),
        "delta": _wire_delta,
        "finish_reason": st.none() | st.sampled_from(["stop", "length", "tool_calls"]),
    },
    optional={"logprobs": st.none()},
)
_wire_chunk = st.fixed_dictionaries(
    {
        "id": st.just("chatcmpl-1"),
        "object": st.just("chat.completion.chunk"),
        "created": st.just(1_700_000_000),
        "model": st.just("gpt-x"),
        "choices": st.lists(_wire_choice, max_size=3, unique_by=lambda c: c["index"]),
    },
    optional={
        "system_fingerprint": st.just("fp_1"),
        "usage": st.builds(
            lambda p, c: {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
            st.integers(0, 10**6),
            st.integers(0, 10**6),
        ),
    },
)


@settings(max_examples=300, deadline=None)
@given(_wire_chunk)
def test_an_upstream_chunk_decodes_to_events_that_render_an_equivalent_chunk(
    chunk: dict[str, Any],
) -> None:
    upstream = OpenAIChunk(b"data: " + msgspec.json.encode(chunk) + b"\n\n")
    events = upstream.events()
    render = ChunkRenderer().render
    rendered = [render(event) for event in events]
    # Decoded again, the rendered chunks say the same: nothing lost, nothing added.
    assert [event for sse in rendered for event in OpenAIChunk(sse).events()] == events
    # And what a client accumulates from them is what it accumulates from the original.
    assert _accumulated([json.loads(sse[6:-2]) for sse in rendered]) == _accumulated([chunk])


def _accumulated(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """What an OpenAI client keeps of a stream: per choice its role, text, refusal, tool calls
    (by index: id, name, arguments) and finish reason; the usage."""
    state: dict[str, Any] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            kept = state.setdefault(choice["index"], {"text": "", "refusal": "", "calls": {}})
            delta = choice["delta"]
            if delta.get("role"):
                kept["role"] = delta["role"]
            kept["text"] += delta.get("content") or ""
            kept["refusal"] += delta.get("refusal") or ""
            for call in delta.get("tool_calls") or ():
                into = kept["calls"].setdefault(call["index"], {"id": None, "name": "", "args": ""})
                function = call.get("function") or {}
                into["id"] = call.get("id", into["id"])
                into["name"] += function.get("name") or ""
                into["args"] += function.get("arguments") or ""
            if choice["finish_reason"] is not None:
                kept["finish"] = choice["finish_reason"]
        if chunk.get("usage") is not None:
            # `Usage` omits counts of 0, as the adapters always have: a missing count is 0.
            zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
            state["usage"] = {**zero, **chunk["usage"]}
    # A choice whose deltas said nothing is no different from one never mentioned.
    return {key: kept for key, kept in state.items() if kept != _NOTHING}


_NOTHING = {"text": "", "refusal": "", "calls": {}}


# --- a non-OpenAI upstream: neutral events, no OpenAI JSON in between ----------------------------


def _anthropic_sse(*events: dict[str, Any]) -> list[bytes]:
    return [f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode() for event in events]


ANTHROPIC_STREAM = _anthropic_sse(
    {
        "type": "message_start",
        "message": {"id": "msg_1", "content": [], "usage": {"input_tokens": 9, "output_tokens": 1}},
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " look"}},
    {"type": "content_block_stop", "index": 0},
    {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}},
    },
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": '{"city": "Paris"}'},
    },
    {"type": "content_block_stop", "index": 1},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use"},
        "usage": {"output_tokens": 12},
    },
    {"type": "message_stop"},
)


async def test_an_anthropic_stream_yields_neutral_events(monkeypatch: pytest.MonkeyPatch) -> None:
    async def send(*_: Any, **__: Any) -> CannedResponse:
        return CannedResponse(ANTHROPIC_STREAM)

    monkeypatch.setattr(adapters.anthropic, "send", send)
    upstream = Upstream(provider="anthropic", model="claude-x", base_url="http://anthropic")
    call = chat_call(stream=True, stream_options={"include_usage": True})
    stream = await AnthropicAdapter(upstream, None).open_stream(call)  # type: ignore[arg-type]
    events = [event async for event in stream]
    # Typed steps only: no chunk bytes, no OpenAI chunk, for any ingress to render its own way.
    assert events == [
        Start("req-1", "claude-x", events[0].created),  # type: ignore[union-attr]
        TextDelta("Let me"),
        TextDelta(" look"),
        ToolCallDelta([ToolCallFragment(0, "toolu_1", "get_weather", "")]),
        ToolCallDelta([ToolCallFragment(0, arguments='{"city": "Paris"}')]),
        Finish("tool_calls"),
        UsageReport(Usage(9, 12, 21)),
    ]
    assert stream.usage == Usage(9, 12, 21) and not stream.usage_estimated
