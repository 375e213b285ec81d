"""Revocation notices: a node telling a peer it cut that peer off.

`Revocation {v, issuer, peer, key_id, iat, sig}`, signed by the issuer's node key: `peer` (the
revoked node) may no longer use the cross-node key `key_id` the issuer gave it. The issuer
sends one when its admin revokes the peer, and answers the peer's later signed requests with
a fresh one, so a peer that was away learns it at its next health check.

A receiver acts on a notice only if it is signed by the pinned key of the peer it comes from,
names the receiver, and names the key that peer issued it: a third party, with a key pair of
its own or none, cannot make a node drop a peer, and a notice replayed after the two nodes
joined again (a new key) changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import msgspec

from federation.descriptors import NodeId, as_fields, public_key_of, refuse_other_signatures
from federation.identity import NodeIdentity
from ledger.records import RecordError, check_fresh, sign_struct, to_struct, verify_fields

VERSION = 1
# Where a notice is posted, and the field of a refusal's error body that carries one.
NOTICE_PATH = "/federation/revoked"
NOTICE_FIELD = "revocation"


class Revocation(msgspec.Struct, frozen=True, kw_only=True):
    v: int = VERSION
    issuer: NodeId
    peer: NodeId
    key_id: str
    iat: int
    sig: str = ""


def make_revocation(
    identity: NodeIdentity, peer: str, key_id: str, now: float | None = None
) -> Revocation:
    """A notice, signed by this node, that `peer` may no longer use the key `key_id`."""
    iat = int(time.time() if now is None else now)
    notice = Revocation(issuer=identity.node_id, peer=peer, key_id=key_id, iat=iat)
    return sign_struct(notice, identity.sign)


def verify_revocation(
    data: bytes | str | Mapping[str, Any],
    *,
    issuer: str,
    me: str,
    key_id: str,
    now: float | None = None,
) -> Revocation:
    """The notice, if `issuer` (pinned) signed it for us about the key `key_id` it gave us;
    RecordError otherwise."""
    fields = as_fields(data)
    if fields.get("issuer") != issuer:
        raise RecordError("the revocation is not from the pinned peer")
    if fields.get("peer") != me:
        raise RecordError("the revocation is about another node")
    if fields.get("key_id") != key_id:
        raise RecordError("the revocation is about another key than the one this peer gave us")
    try:
        key = public_key_of(issuer)
    except ValueError as exc:
        raise RecordError(f"bad pinned node id: {exc}") from exc
    refuse_other_signatures(fields)
    verify_fields(fields, key)
    check_fresh(fields, version=VERSION, now=now, require_exp=False)
    return to_struct(fields, Revocation)
