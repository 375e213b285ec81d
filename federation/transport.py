"""The peer transport: how the router reaches a model another node shares with us.

A peer speaks the same OpenAI-compatible API as any upstream, so this is the OpenAI adapter
with three differences: it authenticates with the cross-node key the peer issued us, it signs
every request with our node key (RFC 9421, see `federation.httpsig`), and it marks the request
as one hop old so that the peer serves it from its own deployments only (no loops, no
reselling).
"""

from __future__ import annotations

from adapters.http import UpstreamClient
from adapters.openai import OpenAIAdapter
from adapters.types import Upstream
from federation.httpsig import sign_request
from federation.identity import NodeIdentity

HOP_HEADER = "aihub-hop"
REQUEST_ID_HEADER = "aihub-request-id"


def peer_upstream(model: str, url: str, key: str, max_output_tokens: int = 4096) -> Upstream:
    return Upstream(
        provider="peer",
        model=model,
        base_url=url.rstrip("/") + "/v1",
        api_key=key,
        max_output_tokens=max_output_tokens,
    )


class PeerAdapter(OpenAIAdapter):
    def __init__(self, upstream: Upstream, client: UpstreamClient, identity: NodeIdentity) -> None:
        super().__init__(upstream, client)
        self.identity = identity

    def request_headers(self, url: str, body: bytes, request_id: str) -> dict[str, str]:
        headers = {
            **self.auth_headers(),
            REQUEST_ID_HEADER: request_id,
            HOP_HEADER: "1",
            "content-type": "application/json",
        }
        headers.update(sign_request(self.identity, "POST", url, headers, body))
        return headers
