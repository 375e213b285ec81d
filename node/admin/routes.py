"""The admin API: keys, tenants, usage and the audit log, for an admin key only.

The same operations as `aihub keys …` and `aihub tenants …` (both go through
`node.admin.management`). Every change is written to the store, audited as `admin:<key id>`, and
seen at once by this process (its key cache is reloaded before the answer) and by every other
process serving the node (through the epoch file).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

import msgspec
from litestar import Request, Response, delete, get, patch, post
from litestar.params import FromPath

from ledger.nesting import bounded
from node.admin.management import (
    KeyInput,
    KeyView,
    Management,
    RotateInput,
    TenantInput,
    TenantView,
)
from node.admin.reports import (
    AUDIT_LIMIT_MAX,
    DEFAULT_SINCE,
    USAGE_BY,
    UsageReport,
    usage_csv,
)
from node.admin.session import admin_caller
from node.gateway.auth import Principal
from node.gateway.keys import HASH_PURPOSE
from node.hub import hub_of
from node.ingress.asgi import JSON, client_ip
from node.ingress.errors import ApiError
from node.storage.base import Store
from node.storage.records import AuditEvent
from node.units import parse_since

T = TypeVar("T")
log = logging.getLogger("aihub.admin")

# --- responses ----------------------------------------------------------------------------


class KeyList(msgspec.Struct, tag_field="object", tag="list"):
    data: list[KeyView]


class TenantList(msgspec.Struct, tag_field="object", tag="list"):
    data: list[TenantView]


class AuditList(msgspec.Struct, tag_field="object", tag="list"):
    data: list[AuditEvent]


def json_response(value: object, status: int = 200) -> Response[bytes]:
    return Response(msgspec.json.encode(value), media_type=JSON, status_code=status)


# --- request parts ------------------------------------------------------------------------

_key_input = msgspec.json.Decoder(KeyInput)
_tenant_input = msgspec.json.Decoder(TenantInput)
_rotate_input = msgspec.json.Decoder(RotateInput)
# `… - at `$.rpm`` or, for a bad key of an object, `… - at `key` in `$.metadata``.
_AT_PATH = re.compile(r" - at (?:`key` in )?`\$\.?([^`]*)`$")
_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]*)`")
_LIMIT = re.compile(r"\d{1,4}", re.ASCII)


def _decode(body: bytes, decoder: msgspec.json.Decoder[T]) -> T:
    """A JSON object body, strictly: wrong types and unknown fields are a 400 naming them."""
    if not body.strip():
        raise ApiError(400, "The request body is empty: send a JSON object")
    try:
        return decoder.decode(bounded(body))
    except msgspec.ValidationError as exc:
        message = str(exc)
        at = _AT_PATH.search(message)
        path = at.group(1) if at else ""
        if at:
            message = message[: at.start()]
        unknown = _UNKNOWN_FIELD.search(message)
        if unknown:
            path = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
        raise ApiError(400, f"Invalid request: {message}", param=path or None) from exc
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}") from exc


def query_param(request: Request, name: str, default: str) -> str:
    value = request.query_params.get(name)
    return default if value is None else value


def flag_param(request: Request, name: str) -> bool:
    value = query_param(request, name, "false").strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no", ""):
        return False
    raise ApiError(400, f"`{name}` is true or false, not {value!r}", param=name)


def since_param(request: Request) -> int:
    try:
        return parse_since(query_param(request, "since", DEFAULT_SINCE))
    except ValueError as exc:
        raise ApiError(400, str(exc), param="since") from exc


async def require_admin(request: Request) -> Principal:
    """The caller, who must hold an admin key (its bearer key, or a dashboard session opened
    with one: `node.admin.session`)."""
    principal = await admin_caller(request)
    if not principal.is_admin:
        hub_of(request).keys.note("auth.not_admin", principal.key_id, client_ip(request))
        raise ApiError(
            403,
            "This endpoint needs an admin key",
            type="permission_error",
            code="admin_key_required",
        )
    return principal


@asynccontextmanager
async def _management(request: Request) -> AsyncIterator[Management]:
    """The management operations, on the node's own store (its lock keeps their statements
    out of the usage writer's transactions). What they refuse (`ManagementError`) is a domain
    error: the app's handler answers it in OpenAI's shape."""
    hub = hub_of(request)
    yield Management(hub.store, hub.identity.derive_secret(HASH_PURPOSE), hub.data_dir)


async def _changed(request: Request) -> None:
    """This process sees a change before it answers (others see it through the epoch file)."""
    await hub_of(request).keys.load()


async def flushed_store(request: Request) -> Store:
    """The node's store, once what this process has queued for it (usage records, audit
    events) is written: a report shows every request this process answered before it was
    asked for. Other processes of the node (workers, hosts) write theirs every 50 ms: a
    request another one answered in the last 50 ms may be in the next report only."""
    hub = hub_of(request)
    try:
        await hub.usage.flush()
    except Exception:
        log.exception("writing queued usage before a report failed")
    return hub.store


def _actor(principal: Principal) -> str:
    return f"admin:{principal.key_id}"


# --- keys ---------------------------------------------------------------------------------


@post("/admin/keys", status_code=201)
async def create_key(request: Request) -> Response[bytes]:
    principal = await require_admin(request)
    spec = _decode(await request.body(), _key_input)
    async with _management(request) as management:
        created = await management.create_key(spec, _actor(principal))
    await _changed(request)
    return json_response(created, 201)


@get("/admin/keys")
async def list_keys(request: Request) -> Response[bytes]:
    await require_admin(request)
    include_revoked = flag_param(request, "include_revoked")
    async with _management(request) as management:
        keys = await management.list_keys(include_revoked=include_revoked)
    return json_response(KeyList(keys))


@get("/admin/keys/{id_or_key:str}")
async def show_key(request: Request, id_or_key: FromPath[str]) -> Response[bytes]:
    await require_admin(request)
    async with _management(request) as management:
        view = await management.key_view(await management.find_key(id_or_key))
    return json_response(view)


@patch("/admin/keys/{id_or_key:str}")
async def update_key(request: Request, id_or_key: FromPath[str]) -> Response[bytes]:
    principal = await require_admin(request)
    spec = _decode(await request.body(), _key_input)
    async with _management(request) as management:
        view = await management.update_key(id_or_key, spec, _actor(principal))
    await _changed(request)
    return json_response(view)


async def _revoke(request: Request, id_or_key: str) -> Response[bytes]:
    principal = await require_admin(request)
    async with _management(request) as management:
        view = await management.revoke_key(id_or_key, _actor(principal))
    await _changed(request)
    return json_response(view)


@post("/admin/keys/{id_or_key:str}/revoke", status_code=200)
async def revoke_key(request: Request, id_or_key: FromPath[str]) -> Response[bytes]:
    return await _revoke(request, id_or_key)


@delete("/admin/keys/{id_or_key:str}", status_code=200)
async def delete_key(request: Request, id_or_key: FromPath[str]) -> Response[bytes]:
    return await _revoke(request, id_or_key)


@post("/admin/keys/{id_or_key:str}/rotate", status_code=200)
async def rotate_key(request: Request, id_or_key: FromPath[str]) -> Response[bytes]:
    principal = await require_admin(request)
    body = await request.body()
    spec = _decode(body, _rotate_input) if body.strip() else RotateInput()
    async with _management(request) as management:
        created = await management.rotate_key(id_or_key, spec.grace_seconds, _actor(principal))
    await _changed(request)
    return json_response(created)


# --- tenants ------------------------------------------------------------------------------


@post("/admin/tenants", status_code=201)
async def create_tenant(request: Request) -> Response[bytes]:
    principal = await require_admin(request)
    spec = _decode(await request.body(), _tenant_input)
    async with _management(request) as management:
        view = await management.create_tenant(spec, _actor(principal))
    await _changed(request)
    return json_response(view, 201)


@get("/admin/tenants")
async def list_tenants(request: Request) -> Response[bytes]:
    await require_admin(request)
    async with _management(request) as management:
        tenants = await management.list_tenants()
    return json_response(TenantList(tenants))


@get("/admin/tenants/{id_or_name:str}")
async def show_tenant(request: Request, id_or_name: FromPath[str]) -> Response[bytes]:
    await require_admin(request)
    async with _management(request) as management:
        view = await management.tenant_view(await management.find_tenant(id_or_name))
    return json_response(view)


@patch("/admin/tenants/{id_or_name:str}")
async def update_tenant(request: Request, id_or_name: FromPath[str]) -> Response[bytes]:
    principal = await require_admin(request)
    spec = _decode(await request.body(), _tenant_input)
    async with _management(request) as management:
        view = await management.update_tenant(id_or_name, spec, _actor(principal))
    await _changed(request)
    return json_response(view)


# --- usage and audit ----------------------------------------------------------------------


@get("/admin/usage")
async def usage(request: Request) -> Response[bytes]:
    await require_admin(request)
    by = query_param(request, "by", "key")
    if by not in USAGE_BY:
        raise ApiError(400, f"`by` is one of key, tenant, model, peer; not {by!r}", param="by")
    output = query_param(request, "format", "json")
    if output not in ("json", "csv"):
        raise ApiError(400, f"`format` is json or csv; not {output!r}", param="format")
    since = since_param(request)
    rows = await (await flushed_store(request)).usage.usage_report(by, since)
    if output == "csv":
        return Response(
            usage_csv(rows).encode(),
            media_type="text/csv",  # Litestar adds `; charset=utf-8` to text types
            headers={"content-disposition": f'attachment; filename="usage-by-{by}.csv"'},
        )
    return json_response(UsageReport(by, since, rows))


@get("/admin/audit")
async def audit(request: Request) -> Response[bytes]:
    await require_admin(request)
    since = since_param(request)
    text = query_param(request, "limit", "100")
    # ASCII digits only: str.isdigit() takes `²`, which int() refuses.
    if not _LIMIT.fullmatch(text) or not 1 <= int(text) <= AUDIT_LIMIT_MAX:
        raise ApiError(400, f"`limit` is 1 to {AUDIT_LIMIT_MAX}, not {text!r}", param="limit")
    action = request.query_params.get("action") or None
    events = await (await flushed_store(request)).audit.audit(since, int(text), action)
    return json_response(AuditList(events))


ADMIN_ROUTES = [
    create_key,
    list_keys,
    show_key,
    update_key,
    revoke_key,
    delete_key,
    rotate_key,
    create_tenant,
    list_tenants,
    show_tenant,
    update_tenant,
    usage,
    audit,
]
