"""The adapter of a route to a model another node shares with us.

A peer speaks the same OpenAI-compatible API as any upstream, so this is the OpenAI adapter
with the peer protocol's headers (`federation.transport`): each call carries the cross-node key
the peer issued us, is signed with our node key and marked one hop old, and the peer's signed
receipt is read from its answer. Its answers are the OpenAI adapter's too: the peer's bytes as
they came (`ChatResult.wire`, a stream's `OpenAIChunk`s), decoded only for a client of another
API, and never its receipt event. It lives in the node because it joins the two: the adapters
import nothing of ours, and federation imports no adapter.
"""

from __future__ import annotations

from adapters.http import UpstreamClient
from adapters.openai import OpenAIAdapter
from adapters.types import Upstream
from federation.identity import NodeIdentity
from federation.transport import RECEIPT_EVENT, RECEIPT_HEADER, peer_call_headers
from node.config import UpstreamSection


def peer_upstream(
    model: str,
    url: str,
    key: str,
    limits: UpstreamSection | None = None,
    max_output_tokens: int = 4096,
) -> Upstream:
    """A peer as an upstream, under the node's `[upstream]` timeouts and size limits: a peer
    is as untrusted as any provider."""
    limits = limits or UpstreamSection()
    return Upstream(
        provider="peer",
        model=model,
        base_url=url.rstrip("/") + "/v1",
        api_key=key,
        max_output_tokens=max_output_tokens,
        connect_timeout=limits.connect_timeout,
        read_timeout=limits.read_timeout,
        max_response_bytes=limits.max_response_bytes,
        max_event_bytes=limits.max_event_bytes,
    )


class PeerAdapter(OpenAIAdapter):
    receipt_header = RECEIPT_HEADER
    receipt_event = RECEIPT_EVENT

    def __init__(self, upstream: Upstream, client: UpstreamClient, identity: NodeIdentity) -> None:
        super().__init__(upstream, client)
        self.identity = identity

    def request_headers(self, url: str, body: bytes, request_id: str) -> dict[str, str]:
        return peer_call_headers(self.identity, url, body, self.upstream.api_key, request_id)
