"""Checking that a request comes from the node it claims to (RFC 9421 signatures)."""

from __future__ import annotations

from collections.abc import Callable

from litestar import Request

from federation.descriptors import public_key_of
from federation.httpsig import SignatureBusy, SignatureError, verify_request
from node.auth import Principal
from node.errors import ApiError
from node.hub import Hub

KeyLookup = Callable[[str], bytes | None]
# When the nonce cache is full: its oldest entries expire second by second.
BUSY_RETRY_SECONDS = 2


def verify_signed(hub: Hub, request: Request, body: bytes, key_for: KeyLookup) -> str:
    """The node id that signed this request, or a 401 saying what is wrong."""
    try:
        return verify_request(
            request.method,
            str(request.url),
            dict(request.headers),
            body,
            public_key_for=key_for,
            nonces=hub.nonces,
        )
    except SignatureBusy as exc:
        raise ApiError(
            503,
            "This node is checking too many signed requests to take another now; try again",
            type="server_error",
            code="signatures_busy",
            headers={"retry-after": str(BUSY_RETRY_SECONDS)},
        ) from exc
    except SignatureError as exc:
        raise ApiError(
            401,
            f"Bad request signature: {exc}",
            type="authentication_error",
            code="bad_signature",
        ) from exc


def pinned_to(node_id: str) -> KeyLookup:
    """Only `node_id`'s own key may sign (its node id is its public key)."""

    def lookup(key_id: str) -> bytes | None:
        return public_key_of(node_id) if key_id == node_id else None

    return lookup


def check_peer(hub: Hub, request: Request, body: bytes, principal: Principal) -> None:
    """A cross-node key is valid only with a signature by the peer it is bound to."""
    if principal.key.peer_id is not None:
        verify_signed(hub, request, body, pinned_to(principal.key.peer_id))
