"""What adapter tests send and read: internal calls built as the gateway builds them from a
client's JSON, and results and streamed events rendered as the OpenAI ingress renders them."""

from __future__ import annotations

from typing import Any

import msgspec

from adapters.types import (
    ChatCall,
    ChatRequest,
    ChatResult,
    EmbedCall,
    EmbeddingRequest,
    EmbedResult,
    UpstreamError,
)
from node.ingress.openai_render import ChunkRenderer, result_body


def chat_call(**fields: object) -> ChatCall:
    body = {"model": "alias", "messages": [{"role": "user", "content": "hi there"}], **fields}
    encoded = msgspec.json.encode(body)
    return ChatCall(
        msgspec.json.decode(encoded, type=ChatRequest),
        msgspec.json.decode(encoded, type=dict[str, msgspec.Raw]),
        "req-1",
    )


def embed_call(**fields: object) -> EmbedCall:
    encoded = msgspec.json.encode({"model": "alias", **fields})
    return EmbedCall(
        msgspec.json.decode(encoded, type=EmbeddingRequest),
        msgspec.json.decode(encoded, type=dict[str, msgspec.Raw]),
        "req-2",
    )


def body_of(result: ChatResult | EmbedResult) -> bytes:
    """The JSON body an OpenAI client gets for a complete answer."""
    return result_body(result)


async def rendered(stream: Any) -> list[bytes]:
    """The SSE events an OpenAI client gets for a stream's events (without `[DONE]`)."""
    render = ChunkRenderer().render
    return [render(event) async for event in stream]


async def collect(stream: Any) -> tuple[list[bytes], UpstreamError | None]:
    """The SSE events an OpenAI client gets for a stream, up to the upstream's error if any."""
    render = ChunkRenderer().render
    events: list[bytes] = []
    try:
        async for event in stream:
            events.append(render(event))
    except UpstreamError as exc:
        return events, exc
    return events, None


def chunks(events: list[bytes]) -> list[dict[str, Any]]:
    """The JSON of each `data:` event a stream yielded, each checked to be one whole event."""
    for event in events:
        assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    return [msgspec.json.decode(event[6:-2]) for event in events]


def last_sent(mock: Any) -> dict[str, Any]:
    """The JSON body of the last request a provider mock received."""
    return msgspec.json.decode(mock.script.received[-1].body)
