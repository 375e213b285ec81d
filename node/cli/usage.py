"""`aihub usage` and `aihub audit`: the reports, read from the node's data folder."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import click
from rich.table import Table

from federation.identity import NODE_ID_PREFIX
from node.admin.management import Management
from node.admin.reports import (
    AUDIT_LIMIT_MAX,
    DEFAULT_SINCE,
    USAGE_BY,
    UsageBy,
    UsageReport,
    usage_csv,
)
from node.cli.folder import currency_of, manage
from node.cli.options import SINCE_HELP, json_option, since_option, with_data_dir
from node.cli.output import console, print_json, short_id, shown, when
from node.storage.records import AuditEvent, UsageGroup
from node.units import money


@click.command("usage")
@click.option(
    "--by", type=click.Choice(USAGE_BY), default="key", show_default=True, help="Group by"
)
@click.option(
    "--since",
    default=DEFAULT_SINCE,
    show_default=True,
    callback=since_option,
    help=SINCE_HELP,
)
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV")
@json_option
@with_data_dir
def usage_command(directory: Path, by: UsageBy, since: int, as_csv: bool, as_json: bool) -> None:
    """Requests, tokens and cost, grouped by key, tenant or model."""

    async def work(m: Management) -> tuple[list[UsageGroup], dict[str, str]]:
        rows = await m.store.usage.usage_report(by, since)
        names: dict[str, str] = {}
        if by == "key":
            names = {k.id: k.name for k in await m.store.keys.keys()}
        elif by == "tenant":
            names = {t.id: t.name for t in await m.store.keys.tenants()}
        return rows, names

    rows, names = manage(directory, work)
    if as_csv:
        click.echo(usage_csv(rows), nl=False)
    elif as_json:
        print_json(UsageReport(by, since, rows))
    else:
        console.print(_usage_table(by, since, rows, names, currency_of(directory)))


def _usage_table(
    by: UsageBy, since: int, rows: list[UsageGroup], names: dict[str, str], currency: str
) -> Table:
    """One row per group (the key's or tenant's name after its id), then the totals."""
    table = Table(title=f"Usage by {by} since {when(since // 1000)}")
    table.add_column(by, overflow="fold")
    for column in ("requests", "errors", "tokens in", "tokens out", "cost", "unbilled", "clamped"):
        table.add_column(column, justify="right", overflow="fold")
    for row in rows:
        label = "(none)" if row.group is None else row.group
        if row.group in names:
            label = f"{row.group} ({names[row.group]})"
        table.add_row(
            shown(label),
            str(row.requests),
            str(row.errors),
            str(row.tokens_in),
            str(row.tokens_out),
            money(row.cost_micros, currency),
            money(row.unbilled_micros, currency),
            str(row.clamped),
        )
    table.add_row(
        "total",
        str(sum(r.requests for r in rows)),
        str(sum(r.errors for r in rows)),
        str(sum(r.tokens_in for r in rows)),
        str(sum(r.tokens_out for r in rows)),
        money(sum(r.cost_micros for r in rows), currency),
        money(sum(r.unbilled_micros for r in rows), currency),
        str(sum(r.clamped for r in rows)),
        style="bold",
    )
    return table


def _short(value: str) -> str:
    return short_id(value) if value.startswith(NODE_ID_PREFIX) else value


@click.command("audit")
@click.option(
    "--since",
    default=DEFAULT_SINCE,
    show_default=True,
    callback=since_option,
    help=SINCE_HELP,
)
@click.option(
    "--action",
    help="Only these actions; * matches anything, e.g. 'auth.*', 'key.*', 'admin_key.reset' "
    "[default: every action]",
)
@click.option(
    "--limit",
    type=click.IntRange(1, AUDIT_LIMIT_MAX),
    default=50,
    show_default=True,
    help=f"At most this many events, the newest (1 to {AUDIT_LIMIT_MAX})",
)
@json_option
@with_data_dir
def audit_command(
    directory: Path, since: int, action: str | None, limit: int, as_json: bool
) -> None:
    """Who changed what, and the security events (bad keys, refused addresses), newest
    first."""
    events = manage(directory, lambda m: m.store.audit.audit(since, limit, action))
    if as_json:
        print_json(events)
    else:
        console.print(_audit_table(events))


def _audit_table(events: list[AuditEvent]) -> Table:
    """The events, a node id (a peer acting or acted on) shortened: `--json` has it whole."""
    table = Table(title="Audit log")
    table.add_column("time (UTC)", no_wrap=True)
    table.add_column("action", no_wrap=True)
    for column in ("actor", "target", "ip", "detail"):
        table.add_column(column, overflow="fold")
    for event in events:
        detail = ", ".join(f"{name}={value}" for name, value in event.detail.items())
        table.add_row(
            datetime.fromtimestamp(event.ts_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S"),
            shown(event.action),
            shown(_short(event.actor or "-")),
            shown(_short(event.target or "-")),
            shown(event.ip or "-"),
            shown(detail),
        )
    return table


def _short(value: str) -> str:
    return short_id(value) if value.startswith(NODE_ID_PREFIX) else value
