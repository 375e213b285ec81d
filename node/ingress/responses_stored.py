"""Responses kept for the key that made them (`store`, OpenAI's default): a follow-up's
`previous_response_id`, and `GET`/`DELETE /v1/responses/{id}` and `…/input_items`.

A kept response holds the conversation it continued (every earlier item, then its own
inputs, each with an id), so that a follow-up is the stored context, the answer's output
items, then the follow-up's input: what the model sees is exactly what a client resending the
whole conversation would send. Another key's response is as absent as one never made (404).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

import msgspec
from litestar import Request, delete, get
from litestar import Response as HttpResponse
from litestar.params import FromPath
from msgspec import Raw, Struct

from federation.ids import random_hex
from node.errors import HubError, Kind
from node.gateway.auth import Principal
from node.hub import Hub, hub_of
from node.ingress.asgi import JSON, authenticate
from node.ingress.errors import ApiError
from node.peers.auth import check_peer
from node.storage.records import StoredResponse

_encode = msgspec.json.encode
_items = msgspec.json.Decoder(list[Raw])
_fields = msgspec.json.Decoder(dict[str, Raw])
_ID_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}


class _Output(Struct):
    output: list[Raw]


class _Deleted(Struct, tag_field="object", tag="response"):
    id: str
    deleted: bool = True


class ItemList(Struct, tag_field="object", tag="list"):
    data: list[Raw]
    first_id: str | None
    last_id: str | None
    has_more: bool = False


class _ItemId(Struct):
    id: str


def _not_found(response_id: str, param: str | None = None) -> HubError:
    message = f"No response `{response_id}` is kept for this key"
    return HubError(Kind.NOT_FOUND, message, param=param, code="response_not_found")


async def earlier_items(hub: Hub, principal: Principal, previous: str | None) -> list[Raw]:
    """The conversation a follow-up continues: none without a `previous_response_id`."""
    if previous is None:
        return []
    stored = await hub.store.responses.get(principal.key_id, previous)
    if stored is None:
        raise _not_found(previous, "previous_response_id")
    return _items.decode(stored.context) + msgspec.json.decode(stored.response, type=_Output).output


async def keep(
    hub: Hub,
    principal: Principal,
    response_id: str,
    body: bytes,
    earlier: list[Raw],
    inputs: list[Raw],
    redaction: Callable[[str], str] | None = None,
) -> None:
    """Keep an answer (its `response` object's JSON: ours, or a Responses upstream's made
    ours) for its key; the caller leaves out one the request said `store: false` for. With
    the guardrails' `redaction` of the request, its inputs (and the instructions the
    response repeats) are kept as the upstream saw them."""
    if redaction is not None:
        from node.gateway.guardrails.texts import redacted_json  # only with a profile

        body = redacted_json(body, redaction)
        inputs = [Raw(redacted_json(item, redaction)) for item in inputs]
    identified = [_identified(item) for item in inputs]
    stored = StoredResponse(
        response_id,
        principal.key_id,
        int(time.time() * 1000),
        body,
        _encode(identified),
        _encode(earlier + identified),
    )
    await hub.store.responses.put(stored)


def _identified(item: Raw) -> Raw:
    """An input item as `input_items` lists it: typed, with an id (a client may leave out
    both, and the item was already validated by its translation into the chat call)."""
    fields = _fields.decode(item)
    kind = msgspec.json.decode(fields.get("type", Raw(b'"message"')), type=str)
    fields["type"] = Raw(_encode(kind))
    if "id" not in fields:
        fields["id"] = Raw(_encode(f"{_ID_PREFIX.get(kind, 'item')}_{random_hex(12)}"))
    return Raw(_encode(fields))


async def _owner(request: Request) -> Principal:
    """The caller, its key checked (a cross-node key only with its peer's signature)."""
    principal = await authenticate(request)
    await check_peer(hub_of(request), request, await request.body(), principal)
    return principal


async def _kept(request: Request, response_id: str) -> StoredResponse:
    principal = await _owner(request)
    stored = await hub_of(request).store.responses.get(principal.key_id, response_id)
    if stored is None:
        raise _not_found(response_id)
    return stored


@get("/v1/responses/{response_id:str}")
async def get_response(request: Request, response_id: FromPath[str]) -> HttpResponse[bytes]:
    stored = await _kept(request, response_id)
    return HttpResponse(stored.response, media_type=JSON)


@delete("/v1/responses/{response_id:str}", status_code=200)
async def delete_response(request: Request, response_id: FromPath[str]) -> HttpResponse[bytes]:
    principal = await _owner(request)
    if not await hub_of(request).store.responses.delete(principal.key_id, response_id):
        raise _not_found(response_id)
    return HttpResponse(_encode(_Deleted(response_id)), media_type=JSON)


@get("/v1/responses/{response_id:str}/input_items")
async def list_input_items(request: Request, response_id: FromPath[str]) -> HttpResponse[bytes]:
    """The request's own input items, newest first unless `order=asc`, as OpenAI lists them
    (one page: a request's input is bounded by the body limit)."""
    order: Literal["asc", "desc"] | str = request.query_params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ApiError(400, f"`order` is asc or desc, not {order!r}", param="order")
    stored = await _kept(request, response_id)
    items = _items.decode(stored.input_items)
    if order == "desc":
        items.reverse()
    ids = [msgspec.json.decode(item, type=_ItemId).id for item in items]
    page = ItemList(items, ids[0] if ids else None, ids[-1] if ids else None)
    return HttpResponse(_encode(page), media_type=JSON)


ROUTES = [get_response, delete_response, list_input_items]
