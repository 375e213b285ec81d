"""Peers' models as `aihub models` lists them, read from the adverts the store holds.

Apart from the federation commands so that `aihub models` opens the store and nothing of the
peer stack (HTTP clients, signing): it starts as fast as the other local commands."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from node.config import store_target

if TYPE_CHECKING:
    from node.storage.records import PeerRecord


class PeerModel(msgspec.Struct):
    """A model a peer lets us use, as `aihub models` lists it."""

    name: str  # `model@peer`, or the bare name where no model of ours shadows it
    kind: str
    peer: str
    model: str
    price_in: int
    price_out: int


def peer_models(directory: Path, local: set[str]) -> list[PeerModel]:
    """Each active peer's models from the adverts we hold: as `model@peer`, and under the bare
    name too where `local` (this node's own names) and no earlier peer has it."""
    records = asyncio.run(_peers(directory))
    rows: list[PeerModel] = []
    taken = set(local)
    for record in records:
        if record.status != "active" or not record.advert:
            continue
        for model in _advert_entries(record.advert):
            kind, name = str(model.get("kind", "chat")), str(model.get("id", ""))
            prices = _price(model.get("price_in")), _price(model.get("price_out"))
            names = [f"{name}@{record.name}"] + ([name] if name not in taken else [])
            taken.add(name)
            rows += [PeerModel(shown_as, kind, record.name, name, *prices) for shown_as in names]
    return rows


def _price(value: object) -> int:
    # An advert is the peer's word: a price that is not a whole number shows as 0, not a crash.
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _advert_entries(advert: str) -> list[dict]:
    try:
        models = msgspec.json.decode(advert).get("models", [])
    except (msgspec.DecodeError, AttributeError):
        return []
    return [model for model in models if isinstance(model, dict)]


async def _peers(directory: Path) -> list[PeerRecord]:
    from node.storage import opened

    async with opened(**store_target(directory)._asdict()) as store:
        return await store.peers.peers()
