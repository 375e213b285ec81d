"""What adapter tests send and read: internal calls built as the gateway builds them from a
client's JSON, and streamed chunks parsed back."""

from __future__ import annotations

from typing import Any

import msgspec

from adapters.types import ChatCall, ChatRequest, EmbedCall, EmbeddingRequest


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


def chunks(events: list[bytes]) -> list[dict[str, Any]]:
    """The JSON of each `data:` event a stream yielded, each checked to be one whole event."""
    for event in events:
        assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    return [msgspec.json.decode(event[6:-2]) for event in events]


def last_sent(mock: Any) -> dict[str, Any]:
    """The JSON body of the last request a provider mock received."""
    return msgspec.json.decode(mock.script.received[-1].body)
