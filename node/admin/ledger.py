"""The ledger through the admin API: the same operations as `aihub ledger …`, in the running
node (admin key only)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import msgspec
from litestar import Request, Response, get, post
from litestar.params import FromPath

from ledger.nesting import bounded
from node.admin.routes import json_response, query_param, require_admin, since_param
from node.hub import hub_of
from node.ingress.asgi import JSON
from node.ingress.errors import ApiError
from node.peers.books.balance import balance as books_balance
from node.peers.books.export import export as books_export
from node.peers.books.link import link_to
from node.peers.books.netting import net as books_net
from node.peers.books.reconciliation import reconcile_with
from node.peers.books.settlement import settle_with
from node.peers.books.verify import ChainCheck
from node.peers.books.verify import verify as books_verify

MAX_NET_BODY = 1024 * 1024


@asynccontextmanager
async def _peer_unreachable() -> AsyncIterator[None]:
    try:
        yield
    except httpx.HTTPError as exc:
        raise ApiError(
            502, f"The peer did not answer ({type(exc).__name__})", code="peer_unreachable"
        ) from exc


@get("/admin/ledger/balance")
async def balance(request: Request) -> Response[bytes]:
    await require_admin(request)
    hub = hub_of(request)
    return json_response(await books_balance(hub.store, hub.identity.node_id))


class VerifyReport(msgspec.Struct):
    ok: bool  # every chain and statement checked out
    chains: list[ChainCheck]


@get("/admin/ledger/verify")
async def verify(request: Request) -> Response[bytes]:
    await require_admin(request)
    checks = await books_verify(hub_of(request).store)
    return json_response(VerifyReport(all(check.ok for check in checks), checks))


@post("/admin/ledger/reconcile/{peer:str}", status_code=200)
async def reconcile(request: Request, peer: FromPath[str]) -> Response[bytes]:
    await require_admin(request)
    hub = hub_of(request)
    async with _peer_unreachable():
        link = await link_to(hub.store, hub.identity, hub.client, peer)
        report = await reconcile_with(hub.store, link, hub.receipts.keep)
    if report.suspended:
        await hub.peering.changed()
    return json_response(report)


@post("/admin/ledger/settle/{peer:str}", status_code=200)
async def settle(request: Request, peer: FromPath[str]) -> Response[bytes]:
    principal = await require_admin(request)
    hub = hub_of(request)
    async with _peer_unreachable():
        link = await link_to(hub.store, hub.identity, hub.client, peer)
        await reconcile_with(hub.store, link, hub.receipts.keep)
        statement = await settle_with(hub.store, link, f"admin:{principal.key_id}")
    return json_response(statement)


@get("/admin/ledger/statements")
async def statements(request: Request) -> Response[bytes]:
    await require_admin(request)
    bodies = await hub_of(request).store.ledger.settlements()
    return json_response({"statements": [msgspec.json.decode(body) for body in bodies]})


class NetRequest(msgspec.Struct, forbid_unknown_fields=True):
    statements: list[dict[str, object]] = []


@post("/admin/ledger/net", status_code=200)
async def net(request: Request) -> Response[bytes]:
    """A transfer plan over our statements and those posted (the group's)."""
    await require_admin(request)
    body = await request.body()
    if len(body) > MAX_NET_BODY:
        raise ApiError(413, "Too many statements at once", code="request_too_large")
    try:
        extra = msgspec.json.decode(bounded(body or b"{}"), type=NetRequest).statements
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ApiError(400, f"Invalid request: {exc}", param="statements") from exc
    hub = hub_of(request)
    bodies = [msgspec.json.encode(item) for item in extra]
    plan = await books_net(hub.store, hub.identity.node_id, bodies)
    return json_response(plan)


@get("/admin/ledger/export")
async def export(request: Request) -> Response[bytes]:
    await require_admin(request)
    fmt = query_param(request, "format", "csv")
    if fmt not in ("csv", "json"):
        raise ApiError(400, "format is csv or json", param="format")
    text = await books_export(hub_of(request).store, since_param(request) // 1000, fmt)
    return Response(text.encode(), media_type="text/csv" if fmt == "csv" else JSON)


LEDGER_ROUTES = [balance, verify, reconcile, settle, statements, net, export]
