"""The node's API surfaces as the benchmark calls them: one request, the same prompt and token
limit, in the Chat Completions, Responses and Anthropic Messages formats. Every surface runs
the same pipeline to the same mock (which speaks only chat completions): what differs between
their arms is the decoding of the request and the rendering of the answer or stream."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

SYSTEM = "You are a helpful assistant."
USER = "Say hello to the benchmark, briefly."
MAX_TOKENS = 16
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]

Name = Literal["chat", "responses", "messages"]


@dataclass(frozen=True)
class Surface:
    """Where a surface's requests go, how it is authenticated, and what marks its answer."""

    path: str
    marker: bytes  # in every complete, non-streamed answer
    stream_events: int  # SSE events of a stream of `chunks` content deltas, beyond those deltas
    anthropic_auth: bool = False  # the key as Anthropic's SDK sends it, not as a bearer token

    def headers(self, key: str) -> dict[str, str]:
        if self.anthropic_auth:
            return {"x-api-key": key, "anthropic-version": "2023-06-01"}
        return {"authorization": f"Bearer {key}"}


SURFACES: dict[str, Surface] = {
    # role, content…, finish, usage, [DONE]
    "chat": Surface("/v1/chat/completions", b"chat.completion", 4),
    # created, in_progress, output_item.added, content_part.added, deltas…, output_text.done,
    # content_part.done, output_item.done, completed
    "responses": Surface("/v1/responses", b'"object":"response"', 8),
    # message_start, ping, content_block_start, deltas…, content_block_stop, message_delta,
    # message_stop
    "messages": Surface("/v1/messages", b'"type":"message"', 6, anthropic_auth=True),
}


def body(surface: Name, model: str, *, stream: bool = False) -> bytes:
    """The chat arm's request in `surface`'s format."""
    data: dict[str, object]
    if surface == "chat":
        data = {"model": model, "messages": MESSAGES, "max_tokens": MAX_TOKENS}
        if stream:
            data |= {"stream": True, "stream_options": {"include_usage": True}}
    elif surface == "responses":
        # `store: false`: a chat completion is not kept either (kept, each answer is also a
        # database write, which is the storage's cost, not the surface's).
        data = {"model": model, "instructions": SYSTEM, "input": USER}
        data |= {"max_output_tokens": MAX_TOKENS, "store": False}
    else:
        data = {"model": model, "system": SYSTEM, "max_tokens": MAX_TOKENS}
        data["messages"] = [{"role": "user", "content": USER}]
    if stream and surface != "chat":
        data["stream"] = True
    return json.dumps(data, separators=(",", ":")).encode()
