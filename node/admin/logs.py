"""`GET /admin/logs` (filtered by key, tenant, model, status and time) and
`GET /admin/logs/{request_id}` (one entry, its bodies): the interaction logs."""

from __future__ import annotations

from litestar import Request, Response, get
from litestar.params import FromPath

from node.admin.log_views import DEFAULT_LOGS_SINCE, LogList, log_filter, summary, whole
from node.admin.routes import json_response, query_param, require_admin
from node.hub import hub_of
from node.ingress.errors import ApiError


@get("/admin/logs")
async def list_logs(request: Request) -> Response[bytes]:
    await require_admin(request)
    query = request.query_params
    try:
        which = log_filter(
            key=query.get("key"),
            tenant=query.get("tenant"),
            model=query.get("model"),
            status=query.get("status"),
            since=query_param(request, "since", DEFAULT_LOGS_SINCE),
            until=query.get("until"),
            limit=query_param(request, "limit", "100"),
        )
    except ValueError as exc:
        param = str(exc).partition(":")[0]
        raise ApiError(400, str(exc), param=param) from None
    hub = hub_of(request)
    await hub.logs.flush()
    entries = await hub.store.logs.logs(which)
    return json_response(LogList([summary(entry) for entry in entries]))


@get("/admin/logs/{request_id:str}")
async def show_log(request: Request, request_id: FromPath[str]) -> Response[bytes]:
    await require_admin(request)
    hub = hub_of(request)
    await hub.logs.flush()
    entry = await hub.store.logs.log(request_id[:128])
    if entry is None:
        raise ApiError(404, "No interaction log of that request", code="not_found")
    return json_response(whole(entry))


LOG_ROUTES = [list_logs, show_log]
