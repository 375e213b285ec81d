"""Node descriptors: who a node is and where to reach it (DESIGN.md, "Objects on the wire").

A descriptor `{v, node_id, name, urls[], iat, exp, sig}` is self-certifying: the node id *is*
the public key (`ed25519:` + unpadded base64url of its 32 bytes), so a descriptor can be checked
without any prior knowledge of the node. Whether that node is one we trust is a separate
question, answered by pinning: once two nodes are peers, `verify_descriptor(..., pinned=id)`
accepts only descriptors signed by that one key.

This module also holds the helpers that turn a node id back into its key (`public_key_of`) and
into the short fingerprint that mDNS announces (`fingerprint`).
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import msgspec

from federation.identity import NODE_ID_PREFIX, NodeIdentity
from ledger.canonical import b64url_decode
from ledger.records import (
    COVERS,
    RecordError,
    check_fresh,
    decode_fields,
    sign_struct,
    to_struct,
    verify_fields,
)

VERSION = 1
DEFAULT_TTL = 7 * 24 * 3600
FINGERPRINT_CHARS = 16

# Descriptor URLs are dialled by other nodes: only http(s), and few enough that a hostile
# descriptor cannot make a node try a thousand addresses.
Url = Annotated[str, msgspec.Meta(pattern=r"^https?://[^\s]+$", max_length=2048)]
NodeName = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
NodeId = Annotated[str, msgspec.Meta(pattern=r"^ed25519:[A-Za-z0-9_-]{43}$")]


class NodeDescriptor(msgspec.Struct, frozen=True, kw_only=True):
    v: int = VERSION
    node_id: NodeId
    name: NodeName
    urls: Annotated[list[Url], msgspec.Meta(max_length=16)]
    iat: int
    exp: int
    sig: str = ""


def public_key_of(node_id: str) -> bytes:
    """The 32-byte Ed25519 public key a node id names; ValueError if the id is malformed."""
    if not isinstance(node_id, str) or not node_id.startswith(NODE_ID_PREFIX):
        raise ValueError(f"not a node id (expected {NODE_ID_PREFIX}…): {node_id!r}")
    key = b64url_decode(node_id[len(NODE_ID_PREFIX) :])  # strict: one spelling per key
    if len(key) != 32:
        raise ValueError("a node id must name a 32-byte Ed25519 key")
    return key


def fingerprint(node_id: str) -> str:
    """A short, stable id for mDNS TXT records: the first 16 characters of the lowercase,
    unpadded RFC 4648 base32 of sha-256(the 32-byte public key), i.e. 80 bits.

    Base32 because DNS labels are case-insensitive; 80 bits so that accidental collisions on
    a LAN are out of the question. It carries no trust (mDNS never does): it only lets an
    operator match what was discovered to a node id they were given.
    """
    digest = hashlib.sha256(public_key_of(node_id)).digest()
    return base64.b32encode(digest).decode().lower()[:FINGERPRINT_CHARS]


def make_descriptor(
    identity: NodeIdentity,
    name: str,
    urls: Sequence[str],
    ttl: int = DEFAULT_TTL,
    now: float | None = None,
) -> NodeDescriptor:
    """This node's descriptor, signed by its node key."""
    iat = int(time.time() if now is None else now)
    if ttl <= 0:
        raise ValueError("ttl must be positive")
    unsigned = NodeDescriptor(
        node_id=identity.node_id, name=name, urls=list(urls), iat=iat, exp=iat + ttl
    )
    # Round-trip through the typed form so that we never sign what a receiver would refuse.
    try:
        to_struct(msgspec.to_builtins(unsigned), NodeDescriptor)
    except RecordError as exc:
        raise ValueError(str(exc)) from exc
    return sign_struct(unsigned, identity.sign)


def as_fields(data: bytes | str | Mapping[str, Any]) -> dict[str, Any]:
    """A received object as the plain JSON fields it was signed as."""
    if isinstance(data, bytes | str):
        try:
            return decode_fields(data)
        except UnicodeDecodeError as exc:  # msgspec raises this, not DecodeError, for bad UTF-8
            raise RecordError("not UTF-8") from exc
    if isinstance(data, Mapping):
        return dict(data)
    raise RecordError("a signed record must be a JSON object")


def refuse_other_signatures(fields: Mapping[str, Any]) -> None:
    """Refuse signature fields other than `sig` in an object signed by one key only.

    `ledger.records` leaves every signature field name (`csig`, `sig_a`, ...) out of the bytes
    `sig` covers, so without this check anyone could add, say, `"csig": null` to a descriptor
    and it would still verify: harmless to the typed object, but the raw JSON that is stored
    and passed on (peer exchange) would no longer be the one its node signed.
    """
    extra = sorted(name for name in COVERS if name != "sig" and name in fields)
    if extra:
        raise RecordError(f"unexpected signature field `{extra[0]}`")


def verify_descriptor(
    data: bytes | str | Mapping[str, Any],
    *,
    pinned: str | None = None,
    now: float | None = None,
) -> NodeDescriptor:
    """A descriptor signed by the key its node id names (and, with `pinned`, by that node
    only), of a known version, fresh; RecordError otherwise."""
    fields = as_fields(data)
    if fields.get("v") != VERSION:
        raise RecordError(f"unsupported descriptor version {fields.get('v')!r}")
    node_id = fields.get("node_id")
    if pinned is not None and node_id != pinned:
        raise RecordError("descriptor is not from the pinned node")
    try:
        key = public_key_of(node_id)  # type: ignore[arg-type]
    except ValueError as exc:
        raise RecordError(f"bad node id: {exc}") from exc
    # The signature is checked on the fields as received, before any typed conversion could
    # drop a field the signer covered.
    refuse_other_signatures(fields)
    verify_fields(fields, key)
    check_fresh(fields, version=VERSION, now=now)
    descriptor = to_struct(fields, NodeDescriptor)
    if descriptor.exp <= descriptor.iat:
        raise RecordError("descriptor expires before it is issued")
    return descriptor
