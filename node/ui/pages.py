"""The dashboard's pages, each rendered on the server from what the admin API answers.

A page reads through the same functions the admin API's handlers call (`Management`, the
store's reports, `node.peers.books`, `node.admin.peers`), and changes nothing: every change a
page offers is a call its script (`static/ui.js`) makes to the admin API itself, with the
session cookie and the session's CSRF token (`node.admin.session`). A page asked for without a
live session sends the browser to the sign-in form.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from litestar import Request, Response, get
from litestar.response import Redirect

from ledger.records import RecordError
from ledger.settlement import parse_statement
from node.admin.log_views import log_filter, whole
from node.admin.management import Management
from node.admin.peers import peer_views
from node.admin.reports import AUDIT_LIMIT_MAX, USAGE_BY
from node.admin.routes import flushed_store
from node.admin.session import current_session
from node.admin.stats import WINDOWS
from node.gateway.keys import HASH_PURPOSE
from node.hub import Hub, hub_of
from node.peers.books.balance import balance
from node.peers.books.errors import BooksError
from node.peers.books.netting import net
from node.storage.records import InteractionLog
from node.ui.render import page
from node.ui.signin import SIGN_IN_PATH
from node.units import parse_since

Context = dict[str, Any]
Loader = Callable[[Request, Hub], Awaitable[Context]]

# The periods the usage explorer and the audit log offer (any `since` the API takes works).
SINCE_CHOICES = ("1h", "24h", "7d", "30d")
NAV = (
    ("overview", "/ui", "Overview"),
    ("keys", "/ui/keys", "Keys"),
    ("tenants", "/ui/tenants", "Tenants"),
    ("usage", "/ui/usage", "Usage"),
    ("peers", "/ui/peers", "Peers"),
    ("ledger", "/ui/ledger", "Ledger"),
    ("audit", "/ui/audit", "Audit log"),
    ("logs", "/ui/logs", "Interaction logs"),
)


def choice(request: Request, name: str, choices: tuple[str, ...], default: str) -> str:
    """A query parameter that must be one of `choices`; anything else is the default."""
    value = request.query_params.get(name, default)
    return value if value in choices else default


async def render(request: Request, name: str, template: str, load: Loader) -> Response:
    found = await current_session(request)
    if found is None:
        return Redirect(SIGN_IN_PATH, status_code=303)
    session, principal = found
    hub = hub_of(request)
    context = await load(request, hub)
    return page(
        template,
        nav=NAV,
        active=name,
        node=hub.config.node.name,
        node_id=hub.identity.node_id,
        currency=hub.config.node.currency,
        csrf=session.csrf,
        signed_in_as=principal.key_id,
        **context,
    )


def _management(hub: Hub) -> Management:
    return Management(hub.store, hub.identity.derive_secret(HASH_PURPOSE), hub.data_dir)


# --- loaders: what each page shows ----------------------------------------------------------


async def _overview(request: Request, hub: Hub) -> Context:
    return {"window": choice(request, "window", tuple(WINDOWS), "day"), "windows": WINDOWS}


async def _keys(request: Request, hub: Hub) -> Context:
    show_revoked = request.query_params.get("revoked") == "1"
    management = _management(hub)
    keys = await management.list_keys(include_revoked=show_revoked)
    return {
        "keys": keys,
        "tenants": await management.list_tenants(),
        "show_revoked": show_revoked,
    }


async def _tenants(request: Request, hub: Hub) -> Context:
    return {"tenants": await _management(hub).list_tenants()}


async def _names(hub: Hub) -> dict[str, str]:
    """What a usage row's group is called: key, tenant and peer names by id."""
    names = {key.id: key.name for key in await hub.store.keys.keys()}
    names.update({tenant.id: tenant.name for tenant in await hub.store.keys.tenants()})
    names.update(
        {peer.node_id: peer.name for peer in await hub.store.peers.peers(include_revoked=True)}
    )
    return names


async def _usage(request: Request, hub: Hub) -> Context:
    by = choice(request, "by", USAGE_BY, "key")
    since = choice(request, "since", SINCE_CHOICES, "7d")
    store = await flushed_store(request)
    rows = await store.usage.usage_report(by, parse_since(since))
    return {
        "by": by,
        "by_choices": USAGE_BY,
        "since": since,
        "since_choices": SINCE_CHOICES,
        "rows": rows,
        "names": await _names(hub),
    }


async def _peers(request: Request, hub: Hub) -> Context:
    return {"peers": await peer_views(hub.store, include_revoked=True)}


class StatementView(msgspec.Struct):
    a: str
    b: str
    from_seq: int
    to_seq: int
    a_owes_b: int
    b_owes_a: int
    net: int
    iat: int


async def _ledger(request: Request, hub: Hub) -> Context:
    me = hub.identity.node_id
    statements = []
    for body in await hub.store.ledger.settlements():
        try:
            s = parse_statement(body)
        except RecordError:
            continue  # `verify` names it; a page shows what it can read
        statements.append(
            StatementView(s.a, s.b, s.from_seq, s.to_seq, s.a_owes_b, s.b_owes_a, s.net, s.iat)
        )
    names = {peer.node_id: peer.name for peer in await hub.store.peers.peers(include_revoked=True)}
    names[me] = f"{hub.config.node.name} (this node)"
    try:
        plan, plan_error = await net(hub.store, me, []), None
    except BooksError as exc:  # a statement we hold is bad: `verify` says which
        plan, plan_error = None, exc.message
    return {
        "balances": await balance(hub.store, me),
        "statements": statements[::-1],
        "plan": plan,
        "plan_error": plan_error,
        "names": names,
    }


async def _audit(request: Request, hub: Hub) -> Context:
    since = choice(request, "since", SINCE_CHOICES, "7d")
    action = (request.query_params.get("action") or "").strip()[:64] or None
    store = await flushed_store(request)
    events = await store.audit.audit(parse_since(since), AUDIT_LIMIT_MAX // 2, action)
    return {
        "events": events,
        "since": since,
        "since_choices": SINCE_CHOICES,
        "action": action or "",
    }


async def _logs(request: Request, hub: Hub) -> Context:
    since = choice(request, "since", SINCE_CHOICES, "24h")
    model = (request.query_params.get("model") or "").strip()[:256] or None
    status = (request.query_params.get("status") or "").strip()
    try:
        which = log_filter(
            key=None,
            tenant=None,
            model=model,
            status=status or None,
            since=since,
            until=None,
            limit="200",
        )
    except ValueError as exc:  # a status that is no status: say so, show nothing
        return _logs_context([], since, model, status, str(exc), await _names(hub))
    await hub.logs.flush()
    entries = await hub.store.logs.logs(which)
    return _logs_context(entries, since, model, status, None, await _names(hub))


def _logs_context(
    entries: list[InteractionLog],
    since: str,
    model: str | None,
    status: str,
    problem: str | None,
    names: dict[str, str],
) -> Context:
    return {
        "entries": entries,
        "since": since,
        "since_choices": SINCE_CHOICES,
        "model": model or "",
        "status_text": status,  # not `status`: that is the page's own HTTP status in `page()`
        "problem": problem,
        "names": names,
    }


async def _log(request: Request, hub: Hub) -> Context:
    await hub.logs.flush()
    entry = await hub.store.logs.log(request.path_params["request_id"][:128])
    return {"entry": whole(entry) if entry is not None else None, "names": await _names(hub)}


# --- the routes -------------------------------------------------------------------------------


@get(["/", "/admin"], include_in_schema=False)
async def root() -> Redirect:
    """A person who opens the node, or its admin API, in a browser finds the dashboard."""
    return Redirect("/ui", status_code=303)


@get("/ui", include_in_schema=False)
async def overview(request: Request) -> Response:
    return await render(request, "overview", "overview.html", _overview)


@get("/ui/keys", include_in_schema=False)
async def keys_page(request: Request) -> Response:
    return await render(request, "keys", "keys.html", _keys)


@get("/ui/tenants", include_in_schema=False)
async def tenants_page(request: Request) -> Response:
    return await render(request, "tenants", "tenants.html", _tenants)


@get("/ui/usage", include_in_schema=False)
async def usage_page(request: Request) -> Response:
    return await render(request, "usage", "usage.html", _usage)


@get("/ui/peers", include_in_schema=False)
async def peers_page(request: Request) -> Response:
    return await render(request, "peers", "peers.html", _peers)


@get("/ui/ledger", include_in_schema=False)
async def ledger_page(request: Request) -> Response:
    return await render(request, "ledger", "ledger.html", _ledger)


@get("/ui/audit", include_in_schema=False)
async def audit_page(request: Request) -> Response:
    return await render(request, "audit", "audit.html", _audit)


@get("/ui/logs", include_in_schema=False)
async def logs_page(request: Request) -> Response:
    return await render(request, "logs", "logs.html", _logs)


@get("/ui/logs/{request_id:str}", include_in_schema=False)
async def log_page(request: Request) -> Response:
    return await render(request, "logs", "log.html", _log)


PAGE_ROUTES = [
    root,
    overview,
    keys_page,
    tenants_page,
    usage_page,
    peers_page,
    ledger_page,
    audit_page,
    logs_page,
    log_page,
]
