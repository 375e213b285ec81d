"""`aihub tenants …`: create, list, show and change tenants, groups of keys with shared
limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from msgspec import UNSET
from rich.table import Table

from node.admin.management import Management, TenantInput, TenantView
from node.cli.access import (
    UNCHANGED,
    budget_text,
    limit_fields,
    limit_options,
    limit_rows,
    meta_option,
    models_text,
    nothing_to_change,
    parallel_text,
    rate_text,
    spec,
)
from node.cli.folder import cli_actor, currency_of, manage
from node.cli.options import Decorator, combined, json_option, with_data_dir
from node.cli.output import console, details, fail, print_json, shown, when


def tenant_options(*, on_update: bool = False) -> Decorator:
    """The options of `tenants create`, or of `tenants update` (not given: unchanged)."""
    return combined(
        limit_options(on_update=on_update), meta_option(on_update=on_update), json_option
    )


def show_tenant(view: TenantView, currency: str) -> None:
    rows = [
        ("id", view.id),
        ("name", view.name),
        ("keys", str(view.keys)),
        *limit_rows(view.limits, view.spend, currency),
        ("created", when(view.created_at)),
    ]
    rows.extend((f"meta {name}", value) for name, value in view.metadata.items())
    details(rows)


@click.group("tenants")
def tenants_group() -> None:
    """Create, list and change tenants: groups of keys with shared limits."""


@tenants_group.command("create")
@click.option("--name", required=True, help="A unique name, e.g. acme")
@tenant_options()
@with_data_dir
def tenants_create(directory: Path, name: str, meta: Any, as_json: bool, **limits: Any) -> None:
    """Create a tenant."""
    tenant_spec = spec(TenantInput, {"name": name, "metadata": meta, **limit_fields(**limits)})
    view = manage(directory, lambda m: m.create_tenant(tenant_spec, cli_actor()))
    if as_json:
        print_json(view)
        return
    console.print(f"Created tenant {view.id}")
    show_tenant(view, currency_of(directory))


@tenants_group.command("list")
@json_option
@with_data_dir
def tenants_list(directory: Path, as_json: bool) -> None:
    """List the tenants."""
    views = manage(directory, lambda m: m.list_tenants())
    if as_json:
        print_json(views)
        return
    currency = currency_of(directory)
    table = Table(title="Tenants")
    table.add_column("id", no_wrap=True, min_width=15)
    for column in ("name", "keys", "models", "budget", "rpm / tpm", "max parallel"):
        table.add_column(column, overflow="fold")
    for view in views:
        table.add_row(
            view.id,
            shown(view.name),
            str(view.keys),
            shown(models_text(view.limits)),
            budget_text(view.limits, view.spend, currency),
            rate_text(view.limits),
            parallel_text(view.limits),
        )
    console.print(table)


@tenants_group.command("show")
@click.argument("id_or_name")
@json_option
@with_data_dir
def tenants_show(directory: Path, id_or_name: str, as_json: bool) -> None:
    """Show one tenant, by its id or name."""

    async def work(m: Management) -> TenantView:
        return await m.tenant_view(await m.find_tenant(id_or_name))

    view = manage(directory, work)
    if as_json:
        print_json(view)
    else:
        show_tenant(view, currency_of(directory))


@tenants_group.command("update")
@click.argument("id_or_name")
@click.option("--name", help=f"A new name {UNCHANGED}")
@tenant_options(on_update=True)
@with_data_dir
def tenants_update(
    directory: Path, id_or_name: str, name: str | None, meta: Any, as_json: bool, **limits: Any
) -> None:
    """Change a tenant's name, limits or metadata: only the options given change, the others
    keep their values. `none` removes a limit (--budget none, --rpm none, --models none)."""
    fields = {"name": UNSET if name is None else name, "metadata": meta, **limit_fields(**limits)}
    if nothing_to_change(fields):
        fail("nothing to change: give at least one option (see --help)")
    tenant_spec = spec(TenantInput, fields)
    view = manage(directory, lambda m: m.update_tenant(id_or_name, tenant_spec, cli_actor()))
    if as_json:
        print_json(view)
        return
    console.print(f"Updated tenant {view.id}")
    show_tenant(view, currency_of(directory))
