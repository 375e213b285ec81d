"""`aihub logs`: the interaction logs, read from the node's data folder (filtered by key,
tenant, model, status and time; one entry whole, bodies and all, by its request id)."""

from __future__ import annotations

from pathlib import Path

import click
import msgspec
from rich.table import Table

from node.admin.log_views import (
    DEFAULT_LOGS_SINCE,
    LOGS_LIMIT_MAX,
    LogList,
    log_filter,
    summary,
    whole,
)
from node.admin.management import Management
from node.cli.folder import currency_of, manage
from node.cli.options import SINCE_HELP, json_option, with_data_dir
from node.cli.output import console, fail, print_json, shown, when
from node.storage.records import InteractionLog
from node.units import money


@click.command("logs")
@click.argument("request_id", required=False)
@click.option("--key", help="Only this key's requests (its id, name or the key)")
@click.option("--tenant", help="Only this tenant's requests (its id or name)")
@click.option("--model", help="Only requests for this model")
@click.option("--status", help="Only requests that ended with this HTTP status, e.g. 200")
@click.option("--since", default=DEFAULT_LOGS_SINCE, show_default=True, help=SINCE_HELP)
@click.option("--until", help="Only requests before this (same forms as --since)")
@click.option(
    "--limit",
    type=click.IntRange(1, LOGS_LIMIT_MAX),
    default=50,
    show_default=True,
    help=f"At most this many, the newest (1 to {LOGS_LIMIT_MAX})",
)
@json_option
@with_data_dir
def logs_command(
    directory: Path,
    request_id: str | None,
    key: str | None,
    tenant: str | None,
    model: str | None,
    status: str | None,
    since: str,
    until: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """The requests and answers of the keys and tenants that log them, newest first; with
    REQUEST_ID, that one whole."""
    if request_id is not None:
        _show(directory, request_id, as_json)
        return
    try:
        which = log_filter(
            key=key,
            tenant=tenant,
            model=model,
            status=status,
            since=since,
            until=until,
            limit=str(limit),
        )
    except ValueError as exc:
        fail(f"--{exc}")

    async def work(m: Management) -> list[InteractionLog]:
        # A name (or a key itself) is looked up: matched as an id, it found nothing, quietly.
        found = which
        if key:
            found = msgspec.structs.replace(found, key_id=(await m.find_key(key)).id)
        if tenant:
            found = msgspec.structs.replace(found, tenant_id=(await m.find_tenant(tenant)).id)
        return await m.store.logs.logs(found)

    entries = manage(directory, work)
    if as_json:
        print_json(LogList([summary(entry) for entry in entries]))
    else:
        console.print(_table(entries, currency_of(directory)))


def _show(directory: Path, request_id: str, as_json: bool) -> None:
    async def work(m: Management) -> InteractionLog | None:
        return await m.store.logs.log(request_id)

    entry = manage(directory, work)
    if entry is None:
        fail(f"no interaction log of the request {request_id!r}")
    view = whole(entry)
    if as_json:
        print_json(view)
        return
    table = Table(title=f"Request {shown(entry.request_id)}", show_header=False)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")
    currency = currency_of(directory)
    for name, value in (
        ("time (UTC)", when(entry.ts_ms // 1000)),
        ("key", entry.key_id or "-"),
        ("tenant", entry.tenant_id or "-"),
        ("model", entry.model),
        ("served by", entry.peer or entry.deployment or ("cache" if entry.cache_hit else "-")),
        ("status", str(entry.status)),
        ("tokens in / out", f"{entry.tokens_in} / {entry.tokens_out}"),
        ("cost", money(entry.cost_micros, currency)),
        ("latency", f"{entry.latency_ms} ms"),
        ("error", entry.error or "-"),
        ("request", view.request),
        ("response", view.response),
        ("findings", bytes(view.findings).decode()),
        ("truncated", "yes" if entry.truncated else "no"),
    ):
        table.add_row(name, shown(value))
    console.print(table)


def _table(entries: list[InteractionLog], currency: str) -> Table:
    table = Table(title="Interaction logs")
    table.add_column("time (UTC)", no_wrap=True)
    table.add_column("request", no_wrap=True)
    for column in ("key", "tenant", "model", "served by"):
        table.add_column(column, overflow="fold")
    for column in ("status", "tokens", "cost", "ms"):
        table.add_column(column, justify="right")
    for entry in entries:
        table.add_row(
            when(entry.ts_ms // 1000),
            shown(entry.request_id),
            shown(entry.key_id or "-"),
            shown(entry.tenant_id or "-"),
            shown(entry.model),
            shown(entry.peer or entry.deployment or ("cache" if entry.cache_hit else "-")),
            str(entry.status),
            f"{entry.tokens_in}/{entry.tokens_out}",
            money(entry.cost_micros, currency),
            str(entry.latency_ms),
        )
    return table
