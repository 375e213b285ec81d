"""Checking that a request comes from the node it claims to (RFC 9421 signatures)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

from litestar import Request

from federation.descriptors import public_key_of
from federation.httpsig import (
    SignatureBusy,
    SignatureError,
    VerifiedSignature,
    check_request,
    remember_nonce,
)
from federation.nonces import nonce_digest
from node.errors import HubError, Kind
from node.gateway.auth import Principal
from node.hub import Hub
from node.ingress.headers import headers_of

KeyLookup = Callable[[str], bytes | None]
# When the nonce cache is full: its oldest entries expire second by second.
BUSY_RETRY_SECONDS = 2
# What a request signature's nonce is recorded for, in the node's durable nonce record.
SIGNATURE_CONTEXT = "httpsig"


async def verify_signed(hub: Hub, request: Request, body: bytes, key_for: KeyLookup) -> str:
    """The node id that signed this request, or an unauthenticated error saying what is wrong.

    A replay is refused twice over: by this process's nonce cache (in memory, bounded: it also
    caps how many signed requests the process takes at once), then by the store, which every
    process of the node shares and which outlives restarts, and which decides (the claims
    asked for while one is being written, together in one transaction: `NonceClaims`).
    """
    now = int(time.time())
    try:
        signed = check_request(
            request.method,
            str(request.url),
            headers_of(request),
            body,
            public_key_for=key_for,
            now=now,
        )
        remember_nonce(hub.nonces, signed, now)
        await _claim(hub, signed, now)
    except SignatureBusy as exc:
        raise HubError(
            Kind.UNAVAILABLE,
            "This node is checking too many signed requests to take another now; try again",
            code="signatures_busy",
            retry_after=BUSY_RETRY_SECONDS,
        ) from exc
    except SignatureError as exc:
        raise HubError(
            Kind.UNAUTHENTICATED, f"Bad request signature: {exc}", code="bad_signature"
        ) from exc
    return signed.keyid


async def _claim(hub: Hub, signed: VerifiedSignature, now: int) -> None:
    pair = nonce_digest(SIGNATURE_CONTEXT, signed.keyid, signed.nonce)
    if not await hub.nonce_claims.claim(pair, signed.keep_until, now):
        raise SignatureError("replay: this nonce was already used")


def pinned_to(node_id: str) -> KeyLookup:
    """Only `node_id`'s own key may sign (its node id is its public key)."""

    def lookup(key_id: str) -> bytes | None:
        return _public_key(node_id) if key_id == node_id else None

    return lookup


@functools.lru_cache(maxsize=1024)
def _public_key(node_id: str) -> bytes:
    """A peer's key from its id, decoded once per peer rather than on each of its requests
    (the ids are those of the peers this node holds; a malformed one raises, uncached)."""
    return public_key_of(node_id)


async def check_peer(hub: Hub, request: Request, body: bytes, principal: Principal) -> None:
    """A cross-node key is valid only with a signature by the peer it is bound to."""
    if principal.key.peer_id is not None:
        await verify_signed(hub, request, body, pinned_to(principal.key.peer_id))
