"""The federation endpoints: what one node asks of another.

Every request here but the public descriptor is signed by the calling node (RFC 9421); a
peer's requests must be signed by its pinned key and, where they spend anything, carry the
cross-node key issued to it.
"""

from __future__ import annotations

import re

import msgspec
from litestar import Request, Response, get, post

from federation.descriptors import public_key_of
from federation.printable import printable
from federation.revocations import NOTICE_FIELD, NOTICE_PATH, make_revocation
from federation.transport import LISTED_HEADER
from ledger.nesting import NestingError, bounded
from node.gateway.auth import Principal
from node.gateway.keys import bearer_token, key_id_of
from node.hub import Hub, hub_of
from node.ingress.asgi import JSON
from node.ingress.errors import ApiError
from node.peers.auth import check_peer, pinned_to, verify_signed
from node.peers.books.served import receipts_page, statements_page, take_receipts
from node.peers.books.settlement import countersign_statement
from node.peers.books.wire import PAGE, StatementBody
from node.peers.revocation import CUT_OFF

WHOLE_NUMBER = re.compile(r"-?[0-9]{1,15}", re.ASCII)
MAX_FEDERATION_BODY = 64 * 1024
MAX_COUNTERSIGNATURE_BODY = 256 * 1024  # a batch of 500
MAX_RECEIPTS_BODY = 2 * 1024 * 1024  # a page of 1000


def self_certifying(key_id: str) -> bytes | None:
    """Any node may sign a join: its node id is its public key."""
    try:
        return public_key_of(key_id)
    except ValueError:
        return None


async def authenticate_peer(request: Request, body: bytes) -> Principal:
    """A peer's request: its cross-node key, signed by the node that key is bound to."""
    hub = hub_of(request)
    principal = await hub.keys.authenticate(
        request.headers.get("authorization"), request.client.host if request.client else None
    )
    if principal.key.peer_id is None:
        raise ApiError(403, "Not a peer's key", type="permission_error", code="not_a_peer")
    await check_peer(hub, request, body, principal)
    return principal


async def ledger_peer(request: Request, body: bytes) -> str:
    """The peer asking about the books between us. Its pinned key's signature alone
    authenticates it: the ledger endpoints spend nothing, and the provider side of a pair that
    only consumes from it holds no key of the consumer's. A cross-node key, if sent, must still
    be valid and bound to the signer."""
    if request.headers.get("authorization"):
        principal = await authenticate_peer(request, body)
        return principal.key.peer_id or ""
    hub = hub_of(request)
    # Read from the store, not this process's view of the peers (which follows a join made
    # by the CLI up to a second late): the peer may ask the moment it joined.
    peers = {p.node_id for p in await hub.store.peers.peers() if p.status == "active"}

    def active_peer(key_id: str) -> bytes | None:
        return public_key_of(key_id) if key_id in peers else None

    return await verify_signed(hub, request, body, active_peer)


async def _small_body(request: Request, limit: int = MAX_FEDERATION_BODY) -> bytes:
    """Federation objects are small: refuse a big body before verifying anything."""
    length = request.headers.get("content-length", "0")
    if length.isdigit() and int(length) > limit:
        raise ApiError(413, "Request too large for a federation endpoint", code="request_too_large")
    body = await request.body()
    if len(body) > limit:
        raise ApiError(413, "Request too large for a federation endpoint", code="request_too_large")
    try:
        # Before the signature is checked: any key pair can sign a join.
        return bounded(body)
    except NestingError as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}") from exc


@get("/federation/node")
async def node_descriptor(request: Request) -> Response[bytes]:
    descriptor = hub_of(request).peering.descriptor()
    return Response(msgspec.json.encode(descriptor), media_type=JSON)


@post("/federation/join", status_code=200)
async def join(request: Request) -> Response[bytes]:
    hub = hub_of(request)
    body = await _small_body(request)
    signer = await verify_signed(hub, request, body, self_certifying)
    answer = await hub.peering.accept_join(body, signer)  # a JoinRefused is answered as it is
    return Response(msgspec.json.encode(answer), media_type=JSON)


@post("/federation/join-request", status_code=200)
async def join_request(request: Request) -> Response[bytes]:
    """A join without an invite: the body is the joiner's signed descriptor. 202 while the
    admin has not approved it (`aihub peers approve`); the same answer as an invited join
    once they have. Asking again is how the joiner learns the outcome."""
    hub = hub_of(request)
    # Kept as sent until the admin decides: at most max_join_requests of these 64 KB.
    body = await _small_body(request)
    signer = await verify_signed(hub, request, body, self_certifying)
    source = request.client.host if request.client else ""
    answer = await hub.peering.take_join_request(body, signer, source)
    if answer is None:
        pending = {"status": "pending", "message": "waiting for the admin's approval"}
        return Response(msgspec.json.encode(pending), media_type=JSON, status_code=202)
    return Response(msgspec.json.encode(answer), media_type=JSON)


async def revoked_refusal(hub: Hub, request: Request, body: bytes) -> Response[bytes] | None:
    """The answer to a signed request from a peer we cut off, with a fresh notice for it;
    None if the request is not one (it is then authenticated as usual). The signature is
    checked first: only the peer itself is told, and a replay is refused as any other."""
    key_id = key_id_of(bearer_token(request.headers.get("authorization")) or "")
    if key_id is None:
        return None
    key = await hub.store.keys.key(key_id)
    if key is None or key.revoked_at is None or key.peer_id is None:
        return None
    peer = await hub.store.peers.peer(key.peer_id)
    if peer is None or peer.status not in CUT_OFF or peer.key_for_them != key.id:
        return None
    await verify_signed(hub, request, body, pinned_to(peer.node_id))
    notice = make_revocation(hub.identity, peer.node_id, key.id)
    name = printable(hub.config.node.name)
    error = {
        "message": f"The node {name} revoked this node's access",
        "type": "authentication_error",
        "code": "peer_revoked",
        "param": None,
    }
    content = msgspec.json.encode({"error": error, NOTICE_FIELD: notice})
    return Response(content, media_type=JSON, status_code=401)


@get("/federation/advert")
async def advert(request: Request) -> Response[bytes]:
    """The advert of what the calling peer's key may use here, signed by this node. This is
    the peer's health check: a peer we cut off is told so here (`revoked_refusal`)."""
    body = await request.body()
    refused = await revoked_refusal(hub_of(request), request, body)
    if refused is not None:
        return refused
    principal = await authenticate_peer(request, body)
    peering = hub_of(request).peering
    await peering.note_listing(principal.key.peer_id or "", LISTED_HEADER in request.headers)
    await peering.newest_seq()
    advert = peering.advert_for(principal.key.limits)
    return Response(msgspec.json.encode(advert), media_type=JSON)


@get("/federation/peers")
async def exchange(request: Request) -> Response[bytes]:
    """Peer exchange: the signed descriptors of our other peers that chose to be listed."""
    principal = await authenticate_peer(request, await request.body())
    listed = hub_of(request).peering.listed_descriptors(principal.key.peer_id or "")
    return Response(msgspec.json.encode({"peers": listed}), media_type=JSON)


@post("/federation/advert", status_code=202)
async def pushed_advert(request: Request) -> Response[bytes]:
    """A peer pushes its new advert: signed by its pinned key (no spending, so no key)."""
    hub = hub_of(request)
    body = await _small_body(request)

    def known_peer(key_id: str) -> bytes | None:
        return public_key_of(key_id) if key_id in hub.peering.peers else None

    signer = await verify_signed(hub, request, body, known_peer)
    await hub.peering.note_listing(signer, LISTED_HEADER in request.headers)
    accepted = await hub.peering.take_advert(signer, body)
    return Response(msgspec.json.encode({"accepted": accepted}), media_type=JSON, status_code=202)


@post(NOTICE_PATH, status_code=200)
async def revoked(request: Request) -> Response[bytes]:
    """A peer tells us it revoked our access: signed by its pinned key, the notice naming us
    and the key it gave us (anything else changes nothing)."""
    hub = hub_of(request)
    body = await _small_body(request)

    def known_peer(key_id: str) -> bytes | None:
        return public_key_of(key_id) if key_id in hub.peering.peers else None

    signer = await verify_signed(hub, request, body, known_peer)
    if not await hub.peering.take_revocation(signer, body):
        raise ApiError(400, "Not a revocation notice for this node", code="invalid_revocation")
    return Response(msgspec.json.encode({"accepted": True}), media_type=JSON)


@post("/federation/countersignatures", status_code=200)
async def countersignatures(request: Request) -> Response[bytes]:
    """A consumer's countersignatures for receipts we issued it, in a batch."""
    body = await _small_body(request, MAX_COUNTERSIGNATURE_BODY)
    principal = await authenticate_peer(request, body)
    try:
        taken = await hub_of(request).receipts.take_countersignatures(
            principal.key.peer_id or "", body
        )
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"Invalid countersignatures: {exc}") from exc
    return Response(msgspec.json.encode({"taken": taken}), media_type=JSON)


@get("/federation/receipts")
async def receipts(request: Request) -> Response[bytes]:
    """A page of one of the chains between the calling peer and us, for reconciliation."""
    peer = await ledger_peer(request, await request.body())
    hub = hub_of(request)
    after = request.query_params.get("after_seq", "0")
    if not after.isascii() or not after.isdigit() or len(after) > 15:
        raise ApiError(400, "after_seq is a whole number", param="after_seq")
    # `limit` (1..1000) is newer than the endpoint: an older consumer asks without it.
    limit = request.query_params.get("limit", str(PAGE))
    if not (limit.isascii() and limit.isdigit() and len(limit) <= 4 and 1 <= int(limit) <= PAGE):
        raise ApiError(400, f"limit is a whole number from 1 to {PAGE}", param="limit")
    provider = request.query_params.get("provider", "")
    page = await receipts_page(
        hub.store, hub.identity.node_id, peer, provider, int(after), int(limit)
    )
    return Response(page, media_type=JSON)


@post("/federation/receipts", status_code=200)
async def missing_receipts(request: Request) -> Response[bytes]:
    """Receipts the calling peer found missing in our books."""
    body = await _small_body(request, MAX_RECEIPTS_BODY)
    peer = await ledger_peer(request, body)
    hub = hub_of(request)
    taken = await take_receipts(hub.store, hub.identity.node_id, peer, body, hub.receipts.keep)
    return Response(msgspec.json.encode({"taken": taken}), media_type=JSON)


@get("/federation/settlements")
async def statements(request: Request) -> Response[bytes]:
    """The statements between the calling peer and us (both signed), for it to recover those
    it lost: a lost answer to a settlement, or a restored backup."""
    peer = await ledger_peer(request, await request.body())
    hub = hub_of(request)
    after = request.query_params.get("after_iat", "-1")
    if not WHOLE_NUMBER.fullmatch(after):
        raise ApiError(400, "after_iat is a whole number", param="after_iat")
    page = await statements_page(hub.store, hub.identity.node_id, peer, int(after))
    return Response(page, media_type=JSON)


@post("/federation/settlements", status_code=200)
async def settlement(request: Request) -> Response[bytes]:
    """A peer proposes a settlement statement: countersigned if our books agree."""
    body = await _small_body(request)
    peer = await ledger_peer(request, body)
    hub = hub_of(request)
    both = await countersign_statement(hub.store, hub.identity, peer, body)
    answer = StatementBody(msgspec.to_builtins(both))
    return Response(msgspec.json.encode(answer), media_type=JSON)


FEDERATION_ROUTES = [
    receipts,
    missing_receipts,
    settlement,
    statements,
    node_descriptor,
    join,
    join_request,
    advert,
    exchange,
    pushed_advert,
    revoked,
    countersignatures,
]
