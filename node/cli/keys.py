"""`aihub keys …`: create, list, show, change, rotate and revoke API keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from msgspec import UNSET
from rich.table import Table

from node.admin.management import CreatedKey, KeyInput, KeyView, Management, RotateInput
from node.cli.access import (
    UNCHANGED,
    budget_text,
    limit_fields,
    limit_options,
    limit_rows,
    meta_option,
    models_text,
    nothing_to_change,
    rate_text,
    spec,
)
from node.cli.folder import cli_actor, currency_of, manage, require_config
from node.cli.options import (
    DURATION_HELP,
    Decorator,
    combined,
    duration_or_zero_option,
    expiry,
    ips_or_none,
    json_option,
    text_or_none,
    with_data_dir,
)
from node.cli.output import console, details, fail, print_json, shown, warn, when


def key_options(*, on_update: bool = False) -> Decorator:
    """The options of `keys create`, or of `keys update` (an option not given: unchanged)."""
    unchanged = f" {UNCHANGED}" if on_update else ""
    return combined(
        click.option(
            "--tenant",
            callback=text_or_none,
            help="Tenant (name or id) the key belongs to; none: no tenant"
            + (unchanged or " [default: none]"),
        ),
        limit_options(on_update=on_update),
        click.option(
            "--expires",
            callback=expiry,
            metavar="DURATION",
            help=f"Expire this long from now: {DURATION_HELP}; never: no expiry"
            + (unchanged or " [default: never]"),
        ),
        click.option(
            "--ips",
            callback=ips_or_none,
            help="Comma-separated addresses or CIDRs the key may be used from, e.g. "
            "'10.0.0.0/8,192.0.2.7'; none: anywhere" + (unchanged or " [default: anywhere]"),
        ),
        meta_option(on_update=on_update),
        json_option,
    )


def key_fields(
    name: str | None,
    tenant: Any,
    expires: Any,
    ips: Any,
    meta: Any,
    **limits: Any,
) -> dict[str, Any]:
    """The key options as KeyInput fields (UNSET: not given)."""
    fields: dict[str, Any] = {
        "name": UNSET if name is None else name,
        "tenant": tenant,
        "allowed_ips": ips,
        "metadata": meta,
        **limit_fields(**limits),
    }
    if expires is not UNSET:
        field, value = expires
        fields[field] = value
    return fields


def show_key(view: KeyView, currency: str) -> None:
    rows = [
        ("id", view.id),
        ("name", view.name),
        ("status", view.status),
        ("admin", "yes" if view.is_admin else "no"),
        ("tenant", view.tenant or "-"),
        *limit_rows(view.limits, view.spend, currency),
        ("allowed ips", ", ".join(view.allowed_ips) or "anywhere"),
        ("expires", when(view.expires_at)),
        ("created", when(view.created_at)),
    ]
    if view.revoked_at is not None:
        rows.append(("revoked", when(view.revoked_at)))
    elif view.previous_key_valid_until is not None:
        rows.append(("old key valid until", when(view.previous_key_valid_until)))
    rows.extend((f"meta {name}", value) for name, value in view.metadata.items())
    details(rows)


def show_created(created: CreatedKey, as_json: bool, title: str, currency: str) -> None:
    if as_json:
        print_json(created)
        return
    console.print(f"{title} (shown once, keep it safe):")
    console.print(f"  [bold green]{created.key}[/]\n", soft_wrap=True, highlight=False)
    show_key(created.record, currency)


@click.group("keys")
def keys_group() -> None:
    """Create, list, change, rotate and revoke API keys."""


@keys_group.command("create")
@click.option("--name", required=True, help="A name for the key, e.g. ci-bot")
@key_options()
@with_data_dir
def keys_create(directory: Path, name: str, as_json: bool, **options: Any) -> None:
    """Create a key; the key itself is shown once, here."""
    key_spec = spec(KeyInput, key_fields(name, **options))
    created = manage(directory, lambda m: m.create_key(key_spec, cli_actor()))
    show_created(created, as_json, "New key", currency_of(directory))
    if not as_json:  # what a script reads stays the JSON alone
        warn_unmatched(directory, created.record.limits.models)


def warn_unmatched(directory: Path, patterns: list[str] | None) -> None:
    """Say which of a key's --models patterns match none of the models this node serves or
    its peers share with it now (kept all the same: a model may come later), as `invite
    create` does: a typo (`gpt4o`) would otherwise show only as the key's 403s."""
    if not patterns:
        return
    from node.cli.federation import advertised_models
    from node.gateway.policy import model_allowed

    names = [deployment.name for deployment in require_config(directory).models]

    async def shared(m: Management) -> list[str]:
        peers = await m.store.peers.peers()
        return [
            f"{model}{at}"
            for p in peers
            for model in advertised_models(p)
            for at in ("", f"@{p.name}")
        ]

    names += manage(directory, shared)
    for pattern in patterns:
        if not any(model_allowed([pattern], name) for name in names):
            warn(
                f"--models pattern {pattern!r} matches none of the models this node serves "
                "or its peers share now; patterns are case-sensitive globs such as gpt-4o*"
            )


@keys_group.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked keys")
@json_option
@with_data_dir
def keys_list(directory: Path, include_revoked: bool, as_json: bool) -> None:
    """List the keys (active and expired; with --all, revoked too)."""
    views = manage(directory, lambda m: m.list_keys(include_revoked=include_revoked))
    if as_json:
        print_json(views)
        return
    currency = currency_of(directory)
    table = Table(title="Keys")
    table.add_column("id", no_wrap=True, min_width=12)
    for column in ("name", "tenant", "status", "models", "budget", "rpm / tpm", "expires"):
        table.add_column(column, overflow="fold")
    for view in views:
        table.add_row(
            view.id,
            shown(view.name + (" (admin)" if view.is_admin else "")),
            shown(view.tenant or "-"),
            view.status,
            shown(models_text(view.limits)),
            budget_text(view.limits, view.spend, currency),
            rate_text(view.limits),
            when(view.expires_at)[:10],
        )
    console.print(table)


@keys_group.command("show")
@click.argument("id_or_key")
@json_option
@with_data_dir
def keys_show(directory: Path, id_or_key: str, as_json: bool) -> None:
    """Show one key, by its id, its name or the key itself."""

    async def work(m: Management) -> KeyView:
        return await m.key_view(await m.find_key(id_or_key))

    view = manage(directory, work)
    if as_json:
        print_json(view)
    else:
        show_key(view, currency_of(directory))


@keys_group.command("update")
@click.argument("id_or_key")
@click.option("--name", help=f"A new name {UNCHANGED}")
@key_options(on_update=True)
@with_data_dir
def keys_update(
    directory: Path, id_or_key: str, name: str | None, as_json: bool, **options: Any
) -> None:
    """Change a key's limits, tenant, expiry, addresses or metadata: only the options given
    change, the others keep their values. `none` removes a limit (--budget none, --rpm none,
    --models none, --tenant none, --ips none); --expires never removes the expiry."""
    fields = key_fields(name, **options)
    if nothing_to_change(fields):
        fail("nothing to change: give at least one option (see --help)")
    key_spec = spec(KeyInput, fields)
    view = manage(directory, lambda m: m.update_key(id_or_key, key_spec, cli_actor()))
    if as_json:
        print_json(view)
        return
    console.print(f"Updated key {view.id}")
    show_key(view, currency_of(directory))
    if fields.get("models", UNSET) is not UNSET:
        warn_unmatched(directory, view.limits.models)


@keys_group.command("revoke")
@click.argument("id_or_key")
@with_data_dir
def keys_revoke(directory: Path, id_or_key: str) -> None:
    """Revoke a key: a running node refuses it from its next request."""
    view = manage(directory, lambda m: m.revoke_key(id_or_key, cli_actor()))
    console.print(shown(f"Revoked key {view.id} ({view.name})"))


@keys_group.command("rotate")
@click.argument("id_or_key")
@click.option(
    "--grace",
    default="24h",
    show_default=True,
    callback=duration_or_zero_option,
    help="How long the old key keeps working (0: stops at once)",
)
@json_option
@with_data_dir
def keys_rotate(directory: Path, id_or_key: str, grace: int, as_json: bool) -> None:
    """Give a key a new secret (same id, limits and spend); the new key is shown once."""
    rotate = spec(RotateInput, {"grace_seconds": grace})
    created = manage(
        directory, lambda m: m.rotate_key(id_or_key, rotate.grace_seconds, cli_actor())
    )
    show_created(created, as_json, "Rotated key", currency_of(directory))
