"""The node's peers through the admin API: status, health, adverts, caps and what they spent
(the same facts as `aihub peers list`, for the dashboard and any other admin client)."""

from __future__ import annotations

import time

import msgspec
from litestar import Request, Response, get

from federation.printable import printable
from node.admin.routes import flag_param, json_response, require_admin
from node.gateway.policy import period_start
from node.hub import hub_of
from node.storage.base import Store
from node.storage.records import KeyRecord, PeerRecord

# What of an advert a peer sent is shown: it is untrusted, so only so many models.
MAX_ADVERT_MODELS = 256


class AdvertModelView(msgspec.Struct):
    id: str
    kind: str
    price_in: int
    price_out: int


class AdvertView(msgspec.Struct):
    seq: int
    iat: int
    exp: int
    models: list[AdvertModelView]


class CapView(msgspec.Struct):
    """What the peer may use here: the key we issued it."""

    key_id: str
    models: list[str] | None
    cap_micros: int | None
    period: str
    spent_micros: int
    reserved_micros: int


class PeerView(msgspec.Struct):
    node_id: str
    name: str
    status: str
    created_at: int
    healthy: bool | None
    latency_ms: int | None
    checked_at: int | None
    listed: bool
    advert: AdvertView | None
    cap: CapView | None
    revoked_at: int | None = None


class PeerList(msgspec.Struct, tag_field="object", tag="list"):
    data: list[PeerView]


class _Advert(msgspec.Struct):
    seq: int = 0
    iat: int = 0
    exp: int = 0
    models: list[dict[str, object]] = []


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def advert_view(text: str | None) -> AdvertView | None:
    """The advert we keep for a peer (checked when it came, but its contents are the peer's
    own words: names escaped, numbers that are not integers shown as 0)."""
    if not text:
        return None
    try:
        advert = msgspec.json.decode(text, type=_Advert)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    models = [
        AdvertModelView(
            printable(str(model.get("id", ""))),
            printable(str(model.get("kind", ""))),
            _int(model.get("price_in")),
            _int(model.get("price_out")),
        )
        for model in advert.models[:MAX_ADVERT_MODELS]
    ]
    return AdvertView(advert.seq, advert.iat, advert.exp, models)


async def cap_view(store: Store, key: KeyRecord | None) -> CapView | None:
    if key is None:
        return None
    limits = key.limits
    start = period_start(limits.budget_period, time.time())
    rows = await store.spend.spend([(f"key:{key.id}", start)])
    spent, reserved = (rows[0].spent, rows[0].reserved) if rows else (0, 0)
    return CapView(
        key.id, limits.models, limits.budget_micros, limits.budget_period, spent, reserved
    )


async def peer_views(store: Store, *, include_revoked: bool) -> list[PeerView]:
    health = await store.peers.peer_health()
    views = []
    record: PeerRecord
    for record in await store.peers.peers(include_revoked=include_revoked):
        healthy, latency, checked = health.get(record.node_id, (None, None, None))
        key = await store.keys.key(record.key_for_them) if record.key_for_them else None
        views.append(
            PeerView(
                node_id=record.node_id,
                name=printable(record.name),
                status=record.status,
                created_at=record.created_at,
                healthy=healthy,
                latency_ms=latency,
                checked_at=checked,
                listed=record.listed,
                advert=advert_view(record.advert),
                cap=await cap_view(store, key),
                revoked_at=record.revoked_at,
            )
        )
    return views


@get("/admin/peers")
async def list_peers(request: Request) -> Response[bytes]:
    await require_admin(request)
    include_revoked = flag_param(request, "include_revoked")
    return json_response(
        PeerList(await peer_views(hub_of(request).store, include_revoked=include_revoked))
    )


PEER_ROUTES = [list_peers]
