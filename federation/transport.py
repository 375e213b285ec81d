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
from federation.httpsig import REQUEST_ID_HEADER, sign_request
from federation.identity import NodeIdentity
from federation.ids import new_request_id

HOP_HEADER = "aihub-hop"
# On a node's signed requests: it wants to be named to the receiver's other peers.
LISTED_HEADER = "aihub-listed"


def signed_headers(
    identity: NodeIdentity,
    method: str,
    url: str,
    body: bytes = b"",
    *,
    key: str | None = None,
    request_id: str | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The headers of a request from this node to another: a request id, the key the other
    node issued us (if any), and our RFC 9421 signature over them and the body."""
    headers = {REQUEST_ID_HEADER: request_id or new_request_id()}
    if key:
        headers["authorization"] = f"Bearer {key}"
    if body:
        headers["content-type"] = "application/json"
    headers.update(extra or {})
    headers.update(sign_request(identity, method, url, headers, body))
    return headers


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
        return signed_headers(
            self.identity,
            "POST",
            url,
            body,
            key=self.upstream.api_key,
            request_id=request_id,
            extra={HOP_HEADER: "1"},
        )
