"""Signed model adverts: what a node offers a peer, and at what price (DESIGN.md).

`ModelAdvert {v, node_id, seq, iat, exp, models[], sig}`; each model is
`{id, kind, context, price_in, price_out, stream}` with prices in integer micro-units per
million tokens (no floats in signed data). `seq` only grows: a receiver keeps the highest valid
advert per peer (`AdvertBook`) and ignores older ones, so a replayed stale advert (say, with
old, lower prices) can never replace a newer one.

A node serves each peer the advert of what that peer's key may use, so adverts are verified
against the *pinned* key of the peer they came from, never a key they name themselves.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import msgspec

from federation.descriptors import NodeId, as_fields, public_key_of, refuse_other_signatures
from federation.identity import NodeIdentity
from ledger.records import MAX_SKEW, RecordError, check_fresh, sign_struct, to_struct, verify_fields

VERSION = 1
MAX_MODELS = 1024

Micros = Annotated[int, msgspec.Meta(ge=0)]


class AdvertModel(msgspec.Struct, frozen=True, kw_only=True):
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    kind: Literal["chat", "embeddings"]
    # Context window in tokens; None where the node does not know it.
    context: Annotated[int, msgspec.Meta(ge=1)] | None = None
    price_in: Micros  # micro-units per 1M input tokens
    price_out: Micros  # micro-units per 1M output tokens
    stream: bool


class ModelAdvert(msgspec.Struct, frozen=True, kw_only=True):
    v: int = VERSION
    node_id: NodeId
    seq: Annotated[int, msgspec.Meta(ge=0)]
    iat: int
    exp: int
    models: Annotated[list[AdvertModel], msgspec.Meta(max_length=MAX_MODELS)]
    sig: str = ""


def _check_models(models: Sequence[AdvertModel]) -> None:
    ids = [model.id for model in models]
    if len(set(ids)) != len(ids):
        raise RecordError("an advert lists a model id twice")


def make_advert(
    identity: NodeIdentity,
    seq: int,
    models: Sequence[AdvertModel],
    ttl: int,
    now: float | None = None,
) -> ModelAdvert:
    """An advert of `models`, signed by this node. The caller keeps `seq` growing (a
    persistent counter): a peer ignores any advert whose seq is not above the last it took."""
    if ttl <= 0:
        raise ValueError("ttl must be positive")
    iat = int(time.time() if now is None else now)
    advert = ModelAdvert(
        node_id=identity.node_id, seq=seq, iat=iat, exp=iat + ttl, models=list(models)
    )
    # Never sign what a receiver would refuse (negative price, duplicate ids, ...).
    try:
        _check_models(to_struct(msgspec.to_builtins(advert), ModelAdvert).models)
    except RecordError as exc:
        raise ValueError(str(exc)) from exc
    return sign_struct(advert, identity.sign)


def verify_advert(
    data: bytes | str | Mapping[str, Any],
    *,
    pinned_node_id: str,
    now: float | None = None,
) -> ModelAdvert:
    """An advert from the pinned peer, signed by its pinned key, of a known version and
    fresh; RecordError otherwise."""
    fields = as_fields(data)
    if fields.get("v") != VERSION:
        raise RecordError(f"unsupported advert version {fields.get('v')!r}")
    if fields.get("node_id") != pinned_node_id:
        raise RecordError("advert is not from the pinned node")
    try:
        key = public_key_of(pinned_node_id)
    except ValueError as exc:
        raise RecordError(f"bad pinned node id: {exc}") from exc
    refuse_other_signatures(fields)
    verify_fields(fields, key)
    check_fresh(fields, version=VERSION, now=now)
    advert = to_struct(fields, ModelAdvert)
    if advert.exp <= advert.iat:
        raise RecordError("advert expires before it is issued")
    _check_models(advert.models)
    return advert


class AdvertBook:
    """The highest-seq verified advert of each peer.

    The highest seq seen is remembered even after its advert expires and is dropped: `seq`
    only grows, so an older advert replayed after expiry must still be ignored.
    """

    def __init__(self) -> None:
        self._adverts: dict[str, ModelAdvert] = {}
        self._high: dict[str, int] = {}

    def accept(self, advert: ModelAdvert) -> bool:
        """Keep a *verified* advert if its seq is above any seen from that node; False (and
        nothing changes) otherwise."""
        high = self._high.get(advert.node_id)
        if high is not None and advert.seq <= high:
            return False
        self._high[advert.node_id] = advert.seq
        self._adverts[advert.node_id] = advert
        return True

    def current(self, node_id: str, now: float | None = None) -> ModelAdvert | None:
        """The peer's advert while `verify_advert` would still accept it (the same 5-minute
        allowance for skew); an expired one is dropped and None returned."""
        advert = self._adverts.get(node_id)
        if advert is None:
            return None
        if advert.exp + MAX_SKEW < (time.time() if now is None else now):
            del self._adverts[node_id]
            return None
        return advert

    def highest_seq(self, node_id: str) -> int | None:
        return self._high.get(node_id)

    def forget(self, node_id: str) -> None:
        """Drop everything about a peer (e.g. when it is revoked)."""
        self._adverts.pop(node_id, None)
        self._high.pop(node_id, None)
