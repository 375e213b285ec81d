"""The peer transport: what makes a request from this node to another a signed peer request.

A peer speaks the same OpenAI-compatible API as any upstream; what differs is here: a request
authenticates with the cross-node key the peer issued us, is signed with our node key (RFC
9421, see `federation.httpsig`), and is marked as one hop old so that the peer serves it from
its own deployments only (no loops, no reselling); the peer answers with a signed receipt, in a
header or, on a stream, an event of its own. The adapter that speaks the API with these headers
is the node's (`node.peers.adapter`): federation imports nothing of the adapters (imports point
node → federation → ledger; adapters stand alone).
"""

from __future__ import annotations

from urllib.parse import quote

from federation.httpsig import REQUEST_ID_HEADER, sign_request
from federation.identity import NodeIdentity
from federation.ids import new_request_id

HOP_HEADER = "aihub-hop"
# On a model call whose client set no output limit: the `max_tokens` in the body is the
# consumer's own bound, and the provider may serve it capped lower (what its cap for the
# consumer has left) rather than refuse it.
OUTPUT_ELASTIC_HEADER = "aihub-output-elastic"
# On a node's signed requests: it wants to be named to the receiver's other peers.
LISTED_HEADER = "aihub-listed"
# A peer's receipt for a complete answer: a response header (unpadded base64url), or on a
# stream an SSE event of this name before `[DONE]` whose data is the receipt.
RECEIPT_HEADER = "aihub-receipt"
# Names the peer that served an answer (to this node's own client); percent-encoded, since a
# peer chooses its own name (`served_by_value`).
SERVED_BY_HEADER = "aihub-served-by"
RECEIPT_EVENT = b"aihub.receipt"


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


def peer_call_headers(
    identity: NodeIdentity,
    url: str,
    body: bytes,
    key: str | None,
    request_id: str,
    *,
    elastic: bool = False,
) -> dict[str, str]:
    """The headers of a model call routed to a peer: signed, with its key, one hop old (and
    `aihub-output-elastic` if its output limit may be lowered)."""
    extra = {HOP_HEADER: "1", OUTPUT_ELASTIC_HEADER: "1"} if elastic else {HOP_HEADER: "1"}
    return signed_headers(identity, "POST", url, body, key=key, request_id=request_id, extra=extra)


def served_by_value(name: str) -> str:
    """A peer's name as a header value: printable ASCII, anything else percent-encoded."""
    return quote(name[:128], safe=" !#$&'()*+,-./:;=?@[]^_`{|}~")
