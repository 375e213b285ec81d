"""Invite tokens and the join proof (DESIGN.md, "Objects on the wire").

An invite token is `aihub1.` + unpadded base64url of the canonical JSON of
`{v, issuer, urls[], token_id, seed, exp, uses, models[], cap_micros, cap_period, sig}`, signed
by the issuer's node key. The token carries no `iat`: DESIGN.md fixes its fields, and its
`exp` is enforced by the issuer on its own clock, so there is no skew to bound.

`seed` (32 random bytes, unpadded base64url) is the private half of a one-off *invite key pair*,
as in Secure Scuttlebutt's invites. The issuer stores only the invite public key
(`InviteRecord`), never the seed, so a leak of its database lets no one forge a join.

To join, the joiner sends a `JoinRequest {v, token_id, descriptor, nonce, iat, proof}`, where
`proof` is the invite key's Ed25519 signature (unpadded base64url) over

    canonical(["aihub-join/1", issuer_node_id, joiner_node_id, nonce, iat])

DESIGN.md writes this as issuer ‖ joiner ‖ nonce ‖ iat; a canonical JSON array is our
unambiguous encoding of that concatenation (no two different tuples give the same bytes, which
plain concatenation of variable-length strings would not guarantee), and the leading
"aihub-join/1" keeps the invite key's signatures from meaning anything in another protocol.
The seed never leaves the joiner, and a captured proof names one joiner and one issuer only.

The issuer's side (`verify_join_request`) checks everything about one request; it cannot see
how often the invite was used or which nonces it has seen, so the caller enforces `uses`
(atomically, in storage) and records each join nonce durably (`join_nonce`: in the store,
shared by every process of the node and kept across restarts) until the request could no
longer be accepted, `iat + MAX_SKEW`, refusing a nonce already recorded. A replayed join
must never get through: it would revoke the key the first one issued.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import msgspec
import nacl.exceptions
import nacl.signing

from federation.descriptors import (
    NodeDescriptor,
    NodeId,
    Url,
    as_fields,
    public_key_of,
    refuse_other_signatures,
    verify_descriptor,
)
from federation.identity import NodeIdentity
from federation.nonces import nonce_digest
from ledger.canonical import b64url, b64url_decode, canonical
from ledger.records import (
    MAX_SKEW,
    RecordError,
    sign_fields,
    to_struct,
    verify_fields,
)

TOKEN_PREFIX = "aihub1."
INVITE_VERSION = 1
JOIN_VERSION = 1
PROOF_CONTEXT = "aihub-join/1"
SEED_BYTES = 32
TOKEN_ID_BYTES = 16
NONCE_BYTES = 16
# What a join nonce is recorded for, in the issuer's durable nonce record.
JOIN_CONTEXT = "join"
# Tokens are pasted by people and parsed before their signature is known to be good: bound
# the work a hostile one can cause.
MAX_TOKEN_CHARS = 8192

# The budget periods of node.gateway.policy.Period, repeated here because federation may not import
# node (imports point node → federation → ledger).
CapPeriod = Literal["daily", "weekly", "monthly", "total"]
B64Id = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{16,128}$")]
ModelId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class JoinError(RecordError):
    """A join request that must be refused; the message says why."""


class Invite(msgspec.Struct, frozen=True, kw_only=True):
    """A parsed, verified invite token (what the joiner holds)."""

    v: int = INVITE_VERSION
    issuer: NodeId
    urls: Annotated[list[Url], msgspec.Meta(min_length=1, max_length=16)]
    token_id: B64Id
    seed: str
    exp: int
    uses: Annotated[int, msgspec.Meta(ge=1)]
    models: Annotated[list[ModelId], msgspec.Meta(max_length=1024)]
    cap_micros: Annotated[int, msgspec.Meta(ge=0)] | None
    cap_period: CapPeriod
    sig: str = ""


class InviteRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What the issuer keeps of an invite: the invite *public* key, never the seed."""

    token_id: str
    invite_public_key: bytes
    exp: int
    uses: int
    models: list[str]
    cap_micros: int | None
    cap_period: CapPeriod


class JoinRequest(msgspec.Struct, frozen=True, kw_only=True):
    v: int = JOIN_VERSION
    token_id: B64Id
    descriptor: NodeDescriptor
    nonce: B64Id
    iat: int
    proof: str


def _now(now: float | None) -> int:
    return int(time.time() if now is None else now)


def create_invite(
    identity: NodeIdentity,
    urls: Sequence[str],
    models: Sequence[str],
    cap_micros: int | None,
    cap_period: CapPeriod,
    uses: int,
    ttl_seconds: int,
    now: float | None = None,
) -> tuple[str, InviteRecord]:
    """A signed invite token to hand to the joiner, and the record the issuer stores."""
    if ttl_seconds <= 0:
        raise ValueError("ttl_seconds must be positive")
    seed = os.urandom(SEED_BYTES)
    invite_key = nacl.signing.SigningKey(seed)
    fields = {
        "v": INVITE_VERSION,
        "issuer": identity.node_id,
        "urls": list(urls),
        "token_id": b64url(os.urandom(TOKEN_ID_BYTES)),
        "seed": b64url(seed),
        "exp": _now(now) + ttl_seconds,
        "uses": uses,
        "models": list(models),
        "cap_micros": cap_micros,
        "cap_period": cap_period,
    }
    # Refuse to issue what a joiner would refuse to parse (bad URL, negative cap, ...).
    try:
        to_struct(fields, Invite)
    except RecordError as exc:
        raise ValueError(str(exc)) from exc
    signed = sign_fields(fields, identity.sign)
    token = TOKEN_PREFIX + b64url(canonical(signed))
    record = InviteRecord(
        token_id=fields["token_id"],
        invite_public_key=bytes(invite_key.verify_key),
        exp=fields["exp"],
        uses=uses,
        models=list(models),
        cap_micros=cap_micros,
        cap_period=cap_period,
    )
    return token, record


def parse_invite(token: str, now: float | None = None) -> Invite:
    """The invite a token carries, signed by its issuer's node key and not yet expired;
    RecordError on anything else. The token must be exactly as issued (no whitespace)."""
    if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX):
        raise RecordError(f"not an invite token (expected {TOKEN_PREFIX}…)")
    if len(token) > MAX_TOKEN_CHARS:
        raise RecordError("invite token too long")
    try:
        payload = b64url_decode(token[len(TOKEN_PREFIX) :])
    except ValueError as exc:
        raise RecordError("invite token is not base64url") from exc
    fields = as_fields(payload)
    # One token, one spelling: the signature covers the canonical form, so any other JSON
    # spelling of the same fields is a token nobody issued.
    if canonical(fields) != payload:
        raise RecordError("invite token is not canonical JSON")
    if fields.get("v") != INVITE_VERSION:
        raise RecordError(f"unsupported invite version {fields.get('v')!r}")
    try:
        issuer_key = public_key_of(fields.get("issuer"))  # type: ignore[arg-type]
    except ValueError as exc:
        raise RecordError(f"bad issuer: {exc}") from exc
    refuse_other_signatures(fields)
    verify_fields(fields, issuer_key)
    invite = to_struct(fields, Invite)
    try:
        seed = b64url_decode(invite.seed)
    except ValueError as exc:
        raise RecordError("invite seed is not base64url") from exc
    if len(seed) != SEED_BYTES:
        raise RecordError("invite seed must be 32 bytes")
    # The issuer enforces exp on its own clock; the joiner allows for skew so as not to
    # refuse a token the issuer would still take.
    if invite.exp + MAX_SKEW < _now(now):
        raise RecordError("invite expired")
    return invite


def join_proof_message(issuer_node_id: str, joiner_node_id: str, nonce: str, iat: int) -> bytes:
    """The bytes the invite key signs: canonical JSON of the DESIGN.md tuple."""
    return canonical([PROOF_CONTEXT, issuer_node_id, joiner_node_id, nonce, iat])


def make_join_request(
    invite: Invite,
    joiner_identity: NodeIdentity,
    joiner_descriptor: NodeDescriptor,
    now: float | None = None,
) -> JoinRequest:
    """The joiner's request: its descriptor and a proof that it holds the invite seed,
    bound to this joiner and this issuer. The seed itself is not in it."""
    if joiner_descriptor.node_id != joiner_identity.node_id:
        raise ValueError("the descriptor is not this node's")
    if not joiner_descriptor.sig:
        raise ValueError("the descriptor is not signed")
    invite_key = nacl.signing.SigningKey(b64url_decode(invite.seed))
    nonce = b64url(os.urandom(NONCE_BYTES))
    iat = _now(now)
    message = join_proof_message(invite.issuer, joiner_identity.node_id, nonce, iat)
    return JoinRequest(
        token_id=invite.token_id,
        descriptor=joiner_descriptor,
        nonce=nonce,
        iat=iat,
        proof=b64url(invite_key.sign(message).signature),
    )


def join_nonce(request: JoinRequest) -> tuple[bytes, int]:
    """The key of a join request's nonce in the issuer's durable record, and the last second
    it must be kept (the request is accepted up to MAX_SKEW after its `iat`)."""
    return nonce_digest(JOIN_CONTEXT, request.token_id, request.nonce), request.iat + MAX_SKEW


def verify_join_request(
    request: bytes | str | Mapping[str, Any] | JoinRequest,
    record: InviteRecord,
    issuer_node_id: str,
    now: float | None = None,
) -> NodeDescriptor:
    """The joiner's verified descriptor, if `request` proves possession of the invite seed of
    `record` for this joiner and this issuer, within the allowed skew, before the invite's
    expiry; JoinError otherwise. Uses and nonce replays are the caller's to enforce."""
    try:
        fields = (
            msgspec.to_builtins(request) if isinstance(request, JoinRequest) else as_fields(request)
        )
    except RecordError as exc:
        raise JoinError(str(exc)) from exc
    if fields.get("v") != JOIN_VERSION:
        raise JoinError(f"unsupported join request version {fields.get('v')!r}")
    try:
        join = to_struct(fields, JoinRequest)
    except RecordError as exc:
        raise JoinError(str(exc)) from exc
    current = _now(now)
    if abs(current - join.iat) > MAX_SKEW:
        raise JoinError("join request issued too far from now (clock skew over 5 minutes)")
    if join.token_id != record.token_id:
        raise JoinError("join request is for another invite")
    if current >= record.exp:  # the issuer's own clock and its own exp: no grace
        raise JoinError("invite expired")
    try:
        # Checked on the fields as received: the typed copy may have dropped signed fields.
        descriptor = verify_descriptor(fields["descriptor"], now=now)
    except RecordError as exc:
        raise JoinError(f"joiner descriptor: {exc}") from exc
    if descriptor.node_id == issuer_node_id:
        raise JoinError("a node cannot join itself")
    message = join_proof_message(issuer_node_id, descriptor.node_id, join.nonce, join.iat)
    try:
        proof = b64url_decode(join.proof)
        nacl.signing.VerifyKey(record.invite_public_key).verify(message, proof)
    except (ValueError, nacl.exceptions.BadSignatureError) as exc:
        raise JoinError("join proof is not by this invite's key") from exc
    return descriptor
