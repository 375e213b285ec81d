"""The `aihub` command line."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import getpass
import logging
import os
import re
import socket
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
import msgspec
from msgspec import UNSET, UnsetType
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from federation.printable import PrintableFormatter, printable
from node import __version__
from node.admin.management import (
    MAX_COUNT,
    CreatedKey,
    KeyInput,
    KeyView,
    Management,
    ManagementError,
    RotateInput,
    SpendView,
    TenantInput,
    TenantView,
)
from node.admin.routes import (
    AUDIT_LIMIT_MAX,
    DEFAULT_SINCE,
    USAGE_BY,
    UsageBy,
    UsageReport,
    usage_csv,
)
from node.cli import discovery as cli_discovery
from node.cli import federation as cli_federation
from node.cli import ledger as cli_ledger
from node.cli import network as cli_network
from node.cli.options import comma_list, parsed, shown
from node.config import (
    CONFIG_FILE,
    DATABASE_FILE,
    IDENTITY_FILE,
    Config,
    ConfigError,
    ServerSection,
    data_dir,
    load_config,
    missing_secrets,
)
from node.gateway.journal import JOURNAL_DIR, left_behind, replay
from node.gateway.policy import PERIODS, Limits, parse_networks
from node.provision import NodeExists, create_node, node_exists
from node.storage import opened
from node.storage.records import UsageGroup
from node.units import amount, money, parse_duration, parse_money, parse_since

console = Console()
errors = Console(stderr=True)


def fail(message: str) -> None:
    # The message may quote what the user typed: no markup, no `:emoji:` codes, taken literally.
    errors.print(f"[bold red]error:[/] {escape(printable(message))}", highlight=False, emoji=False)
    sys.exit(1)


def with_data_dir(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command `--data-dir` (default `$AIHUB_HOME`, else ~/.aihub) as a resolved Path."""

    @click.option(
        "--data-dir",
        "data_dir_option",
        envvar="AIHUB_HOME",
        type=click.Path(file_okay=False),
        help="The node's data folder [default: $AIHUB_HOME, else ~/.aihub]",
    )
    @functools.wraps(command)
    def wrapper(data_dir_option: str | None, **kwargs: Any) -> Any:
        return command(directory=data_dir(data_dir_option), **kwargs)

    return wrapper


def require_config(directory: Path) -> Config:
    try:
        return load_config(directory)
    except ConfigError as exc:
        fail(str(exc))
        raise  # unreachable: fail() exits


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="aihub")
def main() -> None:
    """aihub: a self-hosted, federated, OpenAI-compatible AI model hub."""


@main.command()
@click.option("--name", help="A name for this node, shown to peers [default: the host name]")
@click.option("--if-missing", is_flag=True, help="Do nothing if a node already exists here")
@with_data_dir
def init(directory: Path, name: str | None, if_missing: bool) -> None:
    """Create a node: config, database, Ed25519 identity and an admin key (shown once)."""
    if if_missing and node_exists(directory):
        console.print(f"Using the node at {escape(str(directory))}")
        return
    node_name = name or _default_name(directory)
    try:
        identity, key = create_node(directory, node_name)
    except (NodeExists, ConfigError) as exc:
        fail(str(exc))
        return
    config = require_config(directory)
    console.print(f"Created node [bold]{escape(node_name)}[/] at {escape(str(directory))}")
    console.print(f"Node id: {identity.node_id}")
    console.print(f"\nAdmin key (shown once, keep it safe):\n  [bold green]{key}[/]\n")
    console.print(examples(config, key), highlight=False, soft_wrap=True)


def _default_name(directory: Path) -> str:
    """The machine's short host name: what a peer would recognise."""
    return socket.gethostname().split(".")[0][:64] or directory.resolve().name or "aihub"


def examples(config: Config, key: str) -> str:
    url = f"http://{config.server.host}:{config.server.port}"
    body = '{"model": "echo", "messages": [{"role": "user", "content": "Hello, hub"}]}'
    return (
        "Try it with curl:\n"
        f"  curl {url}/v1/chat/completions \\\n"
        f'    -H "Authorization: Bearer {key}" \\\n'
        f"    -H 'Content-Type: application/json' \\\n"
        f"    -d '{body}'\n\n"
        "Or with the openai Python package:\n"
        "  from openai import OpenAI\n"
        f'  client = OpenAI(base_url="{url}/v1", api_key="{key}")\n'
        '  reply = client.chat.completions.create(model="echo", '
        'messages=[{"role": "user", "content": "Hello, hub"}])\n'
        "  print(reply.choices[0].message.content)"
    )


@main.command()
@click.option("--host", help="Interface to listen on [default: from the config]")
@click.option("--port", type=click.IntRange(1, 65535), help="[default: from the config]")
@click.option("--workers", type=click.IntRange(1, 64), help="[default: from the config]")
@click.option(
    "--server",
    type=click.Choice(["uvicorn", "granian"]),
    default="uvicorn",
    show_default=True,
    help="The ASGI server",
)
@with_data_dir
def serve(
    directory: Path, host: str | None, port: int | None, workers: int | None, server: str
) -> None:
    """Start the node."""
    config = require_config(directory)
    if not (directory / IDENTITY_FILE).exists():
        fail(f"no identity at {directory / IDENTITY_FILE}: run `aihub init`")
    for problem in missing_secrets(config, dict(os.environ)):
        errors.print(f"[yellow]warning:[/] {escape(printable(problem))}", highlight=False)
    host = host or config.server.host
    port = port or config.server.port
    workers = workers or config.server.workers
    # Workers are separate processes: they find the node through the environment.
    os.environ["AIHUB_HOME"] = str(directory)
    # Log lines quote peers' names, URLs and errors: control characters are shown escaped.
    handler = logging.StreamHandler()
    handler.setFormatter(PrintableFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    # Its jobs run every second (noticing CLI changes): only their failures are news.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    # httpx logs every upstream request at INFO: ~200 µs each, and the usage table has it all.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    asyncio.run(_recover(directory))
    url = f"http://{host}:{port}"
    console.print(
        f"aihub {__version__}: node [bold]{escape(config.node.name)}[/] serving "
        f"{escape(', '.join(d.name for d in config.models)) or 'no models'} at {url}/v1",
        highlight=False,
    )
    console.print(f'  curl {url}/v1/models -H "Authorization: Bearer $AIHUB_KEY"', highlight=False)
    with _announced(directory, config, port):
        _run_server(server, host, port, workers, config.server)


def _announced(
    directory: Path, config: Config, port: int
) -> contextlib.AbstractContextManager[Any]:
    """Announce the node over mDNS while it serves, if the config says so (carries no trust:
    it only lets `aihub peers discover` on the LAN find it)."""
    if not config.federation.mdns:
        return contextlib.nullcontext()
    from federation.discovery import announce
    from federation.identity import NodeIdentity

    identity = NodeIdentity.load(directory / IDENTITY_FILE)
    return announce(identity.node_id, port, config.federation.mdns_interface or None)


def _run_server(server: str, host: str, port: int, workers: int, limits: ServerSection) -> None:
    if server == "granian":
        from granian import Granian
        from granian.constants import Interfaces
        from granian.http import HTTP1Settings

        # Granian has a head deadline and a bound on requests in flight, not the rest.
        Granian(
            "node.app:create_app",
            factory=True,
            address=host,
            port=port,
            workers=workers,
            interface=Interfaces.ASGI,
            http1_settings=HTTP1Settings(header_read_timeout=int(limits.header_timeout * 1000)),
            backpressure=limits.max_connections,
        ).serve()
        return
    import uvicorn

    from node.ingress.connections import connection_limit, guarded_protocol

    limits = msgspec.structs.replace(
        limits, max_connections=connection_limit(limits.max_connections)
    )
    uvicorn.run(
        "node.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http=guarded_protocol(limits),  # type: ignore[arg-type]
        timeout_keep_alive=limits.keepalive_timeout,  # type: ignore[arg-type]
        access_log=False,
        log_level="info",
        timeout_graceful_shutdown=10,
    )


async def _recover(directory: Path) -> None:
    """Before any worker starts, no request is in flight: a reservation still held was left by
    a node that stopped mid-request, and would shrink its budget for the rest of the period;
    usage a crash left in the journal is written."""
    segments = left_behind(directory / JOURNAL_DIR)
    async with opened(directory / DATABASE_FILE) as store:
        await store.spend.release_all_reservations()
        await replay(store, segments)


@main.command()
@with_data_dir
def models(directory: Path) -> None:
    """List the models this node serves."""
    config = require_config(directory)
    table = Table(title=shown(f"Models of {config.node.name}"))
    for column in ("name", "kind", "provider", "upstream model", "in $/1M", "out $/1M"):
        table.add_column(column)
    for d in config.models:
        table.add_row(
            shown(d.name),
            d.kind,
            d.provider,
            shown(d.model or d.name),
            f"{d.price_in / 1e6:g}",
            f"{d.price_out / 1e6:g}",
        )
    console.print(table)


@main.group()
def config() -> None:
    """Inspect the node's config."""


@config.command("check")
@with_data_dir
def config_check(directory: Path) -> None:
    """Validate the config; say exactly what is wrong and where."""
    loaded = require_config(directory)
    problems = missing_secrets(loaded, dict(os.environ))
    for problem in problems:
        errors.print(f"[bold red]error:[/] {escape(printable(problem))}", highlight=False)
    if problems:
        sys.exit(1)
    console.print(
        f"{escape(str(directory / CONFIG_FILE))}: ok ({len(loaded.models)} deployments, "
        f"{len({d.name for d in loaded.models})} models)",
        highlight=False,
    )


# --- keys, tenants, usage and audit ---------------------------------------------------------
# These work on the node's data folder directly (access to it is the admin's credential); a
# running node sees every change on its next request, through the epoch file.

NONE_WORDS = ("none", "null")
# KeyInput/TenantInput fields by the option that sets them, for error messages.
OPTION_OF_FIELD = {
    "budget_micros": "--budget",
    "budget_period": "--period",
    "max_parallel": "--max-parallel",
    "allowed_ips": "--ips",
    "expires_in": "--expires",
    "expires_at": "--expires",
    "metadata": "--meta",
    "grace_seconds": "--grace",
}
T = TypeVar("T")


def _is_none(text: str) -> bool:
    return text.strip().lower() in NONE_WORDS


def _money_option(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return UNSET
    if _is_none(value):
        return None
    try:
        return parse_money(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def _count_option(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return UNSET
    if _is_none(value):
        return None
    text = value.strip()
    # ASCII digits only: str.isdigit() takes `²`, which int() refuses.
    if not re.fullmatch(r"\d{1,13}", text, re.ASCII) or not 1 <= int(text) <= MAX_COUNT:
        raise click.BadParameter(f"a whole number from 1 to {MAX_COUNT}, or none; not {value!r}")
    return int(text)


def _globs_option(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return UNSET
    if _is_none(value):
        return None
    globs = comma_list(value)
    if not globs:
        raise click.BadParameter("comma-separated model names or globs, or none for every model")
    return globs


def _ips_option(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return UNSET
    if _is_none(value):
        return []
    ips = comma_list(value)
    try:
        parse_networks(ips)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    return ips


def _tenant_option(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return UNSET
    return None if _is_none(value) else value


def _expires_option(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    """`never` -> ("expires_at", None); `30d` -> ("expires_in", 2592000)."""
    if value is None:
        return UNSET
    if value.strip().lower() in ("never", *NONE_WORDS):
        return ("expires_at", None)
    try:
        return ("expires_in", parse_duration(value))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


_duration_option = parsed(functools.partial(parse_duration, allow_zero=True))
_since_option = parsed(parse_since)


def _meta_option(
    _ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]
) -> dict[str, str] | UnsetType:
    if not value:
        return UNSET
    metadata: dict[str, str] = {}
    for item in value:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"metadata is key=value, not {item!r}")
        metadata[name.strip()] = text
    return metadata


def _options(*decorators: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def apply(command: Any) -> Any:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return apply


_limit_options = _options(
    click.option(
        "--models",
        callback=_globs_option,
        help="Comma-separated model names or globs, e.g. 'gpt-4o*,llama3' (none: every model)",
    ),
    click.option(
        "--budget",
        callback=_money_option,
        help="Spend cap per period in currency units, e.g. 20 or 0.5 (none: no cap)",
    ),
    click.option("--period", type=click.Choice(PERIODS), help="Budget period [default: monthly]"),
    click.option("--rpm", callback=_count_option, help="Requests per minute (none: no limit)"),
    click.option("--tpm", callback=_count_option, help="Tokens per minute (none: no limit)"),
    click.option(
        "--max-parallel", callback=_count_option, help="Requests in flight (none: no limit)"
    ),
)
_key_options = _options(
    click.option(
        "--tenant", callback=_tenant_option, help="Tenant (name or id) the key belongs to"
    ),
    _limit_options,
    click.option(
        "--expires",
        callback=_expires_option,
        help="Expire after a duration (30d, 12h) or never [default: never]",
    ),
    click.option(
        "--ips",
        callback=_ips_option,
        help="Comma-separated addresses or CIDRs the key may be used from (none: anywhere)",
    ),
    click.option(
        "--meta",
        multiple=True,
        callback=_meta_option,
        metavar="KEY=VALUE",
        help="Metadata (repeatable; replaces all metadata on update)",
    ),
    click.option("--json", "as_json", is_flag=True, help="Print JSON"),
)
_tenant_options = _options(
    _limit_options,
    click.option(
        "--meta",
        multiple=True,
        callback=_meta_option,
        metavar="KEY=VALUE",
        help="Metadata (repeatable; replaces all metadata on update)",
    ),
    click.option("--json", "as_json", is_flag=True, help="Print JSON"),
)


def _spec(kind: type[T], fields: dict[str, Any]) -> T:
    """Validate options the way the admin API validates a body."""
    given = {name: value for name, value in fields.items() if value is not UNSET}
    try:
        return msgspec.convert(given, kind)
    except msgspec.ValidationError as exc:
        message = str(exc)
        # `… - at `$.rpm`` or, for a metadata name, `… - at `key` in `$.metadata``.
        at = re.search(r" - at (?:`key` in )?`\$\.(\w+)", message)
        if at is None:
            fail(message)
            raise
        field = at.group(1)
        option = OPTION_OF_FIELD.get(field, "--" + field.replace("_", "-"))
        fail(f"{option}: {message[: at.start()]}")
        raise


def _key_fields(
    name: str | None,
    tenant: Any,
    expires: Any,
    ips: Any,
    meta: Any,
    **limits: Any,
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "name": UNSET if name is None else name,
        "tenant": tenant,
        "allowed_ips": ips,
        "metadata": meta,
        **_limit_fields(**limits),
    }
    if expires is not UNSET:
        field, value = expires
        fields[field] = value
    return fields


def _limit_fields(
    models: Any, budget: Any, period: str | None, rpm: Any, tpm: Any, max_parallel: Any
) -> dict[str, Any]:
    return {
        "models": models,
        "budget_micros": budget,
        "budget_period": UNSET if period is None else period,
        "rpm": rpm,
        "tpm": tpm,
        "max_parallel": max_parallel,
    }


def _cli_actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return "cli"


def _manage(directory: Path, work: Callable[[Management], Awaitable[T]]) -> T:
    """Run `work` on the node's data folder; a refused change fails the command."""
    require_config(directory)
    if not (directory / IDENTITY_FILE).exists():
        fail(f"no identity at {directory / IDENTITY_FILE}: run `aihub init`")

    async def run() -> T:
        management = await Management.open(directory)
        try:
            return await work(management)
        finally:
            await management.close()

    try:
        return asyncio.run(run())
    except ManagementError as exc:
        fail(exc.message)
        raise


def _currency(directory: Path) -> str:
    """The currency the node's amounts are in, to show them in."""
    return require_config(directory).node.currency


def _print_json(value: object) -> None:
    click.echo(msgspec.json.format(msgspec.json.encode(value), indent=2).decode())


def _when(seconds: int | None, empty: str = "never") -> str:
    if seconds is None:
        return empty
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _models_text(limits: Limits) -> str:
    return "all" if limits.models is None else ", ".join(limits.models) or "(none)"


def _budget_text(limits: Limits, spend: SpendView | None, currency: str) -> str:
    if limits.budget_micros is None:
        return "-"
    spent = spend.spent_micros if spend else 0
    budget = amount(limits.budget_micros, currency)
    return f"{amount(spent, currency)} / {budget} {limits.budget_period}"


def _rate_text(limits: Limits) -> str:
    rpm = "-" if limits.rpm is None else str(limits.rpm)
    tpm = "-" if limits.tpm is None else str(limits.tpm)
    return f"{rpm} / {tpm}"


def _details(rows: list[tuple[str, str]]) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for label, value in rows:
        grid.add_row(shown(label), shown(value))
    console.print(grid)


def _limit_rows(limits: Limits, spend: SpendView | None, currency: str) -> list[tuple[str, str]]:
    rows = [
        ("models", _models_text(limits)),
        ("budget", _budget_text(limits, spend, currency)),
        ("rpm / tpm", _rate_text(limits)),
        ("max parallel", "-" if limits.max_parallel is None else str(limits.max_parallel)),
    ]
    if spend is not None:
        rows.append(("reserved", amount(spend.reserved_micros, currency)))
        rows.append(("resets", _when(spend.resets_at)))
    return rows


def _show_key(view: KeyView, currency: str) -> None:
    rows = [
        ("id", view.id),
        ("name", view.name),
        ("status", view.status),
        ("admin", "yes" if view.is_admin else "no"),
        ("tenant", view.tenant or "-"),
        *_limit_rows(view.limits, view.spend, currency),
        ("allowed ips", ", ".join(view.allowed_ips) or "anywhere"),
        ("expires", _when(view.expires_at)),
        ("created", _when(view.created_at)),
    ]
    if view.revoked_at is not None:
        rows.append(("revoked", _when(view.revoked_at)))
    elif view.previous_key_valid_until is not None:
        rows.append(("old key valid until", _when(view.previous_key_valid_until)))
    rows.extend((f"meta {name}", value) for name, value in view.metadata.items())
    _details(rows)


def _show_tenant(view: TenantView, currency: str) -> None:
    rows = [
        ("id", view.id),
        ("name", view.name),
        ("keys", str(view.keys)),
        *_limit_rows(view.limits, view.spend, currency),
        ("created", _when(view.created_at)),
    ]
    rows.extend((f"meta {name}", value) for name, value in view.metadata.items())
    _details(rows)


def _show_created(created: CreatedKey, as_json: bool, title: str, currency: str) -> None:
    if as_json:
        _print_json(created)
        return
    console.print(f"{title} (shown once, keep it safe):")
    console.print(f"  [bold green]{created.key}[/]\n", soft_wrap=True, highlight=False)
    _show_key(created.record, currency)


@main.group("keys")
def keys_group() -> None:
    """Create, list, change, rotate and revoke API keys."""


@keys_group.command("create")
@click.option("--name", required=True, help="A name for the key, e.g. ci-bot")
@_key_options
@with_data_dir
def keys_create(directory: Path, name: str, as_json: bool, **options: Any) -> None:
    """Create a key; the key itself is shown once, here."""
    spec = _spec(KeyInput, _key_fields(name, **options))
    created = _manage(directory, lambda m: m.create_key(spec, _cli_actor()))
    _show_created(created, as_json, "New key", _currency(directory))


@keys_group.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked keys")
@click.option("--json", "as_json", is_flag=True, help="Print JSON")
@with_data_dir
def keys_list(directory: Path, include_revoked: bool, as_json: bool) -> None:
    """List the keys (active and expired; with --all, revoked too)."""
    views = _manage(directory, lambda m: m.list_keys(include_revoked=include_revoked))
    if as_json:
        _print_json(views)
        return
    currency = _currency(directory)
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
            shown(_models_text(view.limits)),
            _budget_text(view.limits, view.spend, currency),
            _rate_text(view.limits),
            _when(view.expires_at)[:10],
        )
    console.print(table)


@keys_group.command("show")
@click.argument("id_or_key")
@click.option("--json", "as_json", is_flag=True, help="Print JSON")
@with_data_dir
def keys_show(directory: Path, id_or_key: str, as_json: bool) -> None:
    """Show one key, by its id or by the key itself."""

    async def work(m: Management) -> KeyView:
        return await m.key_view(await m.find_key(id_or_key))

    view = _manage(directory, work)
    if as_json:
        _print_json(view)
    else:
        _show_key(view, _currency(directory))


@keys_group.command("update")
@click.argument("id_or_key")
@click.option("--name", help="A new name")
@_key_options
@with_data_dir
def keys_update(
    directory: Path, id_or_key: str, name: str | None, as_json: bool, **options: Any
) -> None:
    """Change a key's limits, tenant, expiry, addresses or metadata; `none` removes a limit
    (e.g. --budget none, --rpm none, --models none, --tenant none, --expires never)."""
    fields = _key_fields(name, **options)
    if all(value is UNSET for value in fields.values()):
        fail("nothing to change: give at least one option (see --help)")
    spec = _spec(KeyInput, fields)
    view = _manage(directory, lambda m: m.update_key(id_or_key, spec, _cli_actor()))
    if as_json:
        _print_json(view)
        return
    console.print(f"Updated key {view.id}")
    _show_key(view, _currency(directory))


@keys_group.command("revoke")
@click.argument("id_or_key")
@with_data_dir
def keys_revoke(directory: Path, id_or_key: str) -> None:
    """Revoke a key: a running node refuses it from its next request."""
    view = _manage(directory, lambda m: m.revoke_key(id_or_key, _cli_actor()))
    console.print(shown(f"Revoked key {view.id} ({view.name})"))


@keys_group.command("rotate")
@click.argument("id_or_key")
@click.option(
    "--grace",
    default="24h",
    show_default=True,
    callback=_duration_option,
    help="How long the old key keeps working (0: stops at once)",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON")
@with_data_dir
def keys_rotate(directory: Path, id_or_key: str, grace: int, as_json: bool) -> None:
    """Give a key a new secret (same id, limits and spend); the new key is shown once."""
    spec = _spec(RotateInput, {"grace_seconds": grace})
    created = _manage(
        directory, lambda m: m.rotate_key(id_or_key, spec.grace_seconds, _cli_actor())
    )
    _show_created(created, as_json, "Rotated key", _currency(directory))


@main.group("tenants")
def tenants_group() -> None:
    """Create, list and change tenants: groups of keys with shared limits."""


@tenants_group.command("create")
@click.option("--name", required=True, help="A unique name, e.g. acme")
@_tenant_options
@with_data_dir
def tenants_create(directory: Path, name: str, meta: Any, as_json: bool, **limits: Any) -> None:
    """Create a tenant."""
    spec = _spec(TenantInput, {"name": name, "metadata": meta, **_limit_fields(**limits)})
    view = _manage(directory, lambda m: m.create_tenant(spec, _cli_actor()))
    if as_json:
        _print_json(view)
        return
    console.print(f"Created tenant {view.id}")
    _show_tenant(view, _currency(directory))


@tenants_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON")
@with_data_dir
def tenants_list(directory: Path, as_json: bool) -> None:
    """List the tenants."""
    views = _manage(directory, lambda m: m.list_tenants())
    if as_json:
        _print_json(views)
        return
    currency = _currency(directory)
    table = Table(title="Tenants")
    table.add_column("id", no_wrap=True, min_width=15)
    for column in ("name", "keys", "models", "budget", "rpm / tpm", "max parallel"):
        table.add_column(column, overflow="fold")
    for view in views:
        table.add_row(
            view.id,
            shown(view.name),
            str(view.keys),
            shown(_models_text(view.limits)),
            _budget_text(view.limits, view.spend, currency),
            _rate_text(view.limits),
            "-" if view.limits.max_parallel is None else str(view.limits.max_parallel),
        )
    console.print(table)


@tenants_group.command("show")
@click.argument("id_or_name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON")
@with_data_dir
def tenants_show(directory: Path, id_or_name: str, as_json: bool) -> None:
    """Show one tenant, by its id or name."""

    async def work(m: Management) -> TenantView:
        return await m.tenant_view(await m.find_tenant(id_or_name))

    view = _manage(directory, work)
    if as_json:
        _print_json(view)
    else:
        _show_tenant(view, _currency(directory))


@tenants_group.command("update")
@click.argument("id_or_name")
@click.option("--name", help="A new name")
@_tenant_options
@with_data_dir
def tenants_update(
    directory: Path, id_or_name: str, name: str | None, meta: Any, as_json: bool, **limits: Any
) -> None:
    """Change a tenant's name, limits or metadata; `none` removes a limit."""
    fields = {"name": UNSET if name is None else name, "metadata": meta, **_limit_fields(**limits)}
    if all(value is UNSET for value in fields.values()):
        fail("nothing to change: give at least one option (see --help)")
    spec = _spec(TenantInput, fields)
    view = _manage(directory, lambda m: m.update_tenant(id_or_name, spec, _cli_actor()))
    if as_json:
        _print_json(view)
        return
    console.print(f"Updated tenant {view.id}")
    _show_tenant(view, _currency(directory))


@main.command("usage")
@click.option(
    "--by", type=click.Choice(USAGE_BY), default="key", show_default=True, help="Group by"
)
@click.option(
    "--since",
    default=DEFAULT_SINCE,
    show_default=True,
    callback=_since_option,
    help="A duration back from now (30m, 24h, 7d), a date (2025-01-31) or unix seconds",
)
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV")
@click.option("--json", "as_json", is_flag=True, help="Print JSON")
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

    rows, names = _manage(directory, work)
    if as_csv:
        click.echo(usage_csv(rows), nl=False)
        return
    if as_json:
        _print_json(UsageReport(by, since, rows))
        return
    currency = _currency(directory)
    table = Table(title=f"Usage by {by} since {_when(since // 1000)}")
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
    console.print(table)


@main.command("audit")
@click.option(
    "--since",
    default=DEFAULT_SINCE,
    show_default=True,
    callback=_since_option,
    help="A duration back from now (30m, 24h, 7d), a date (2025-01-31) or unix seconds",
)
@click.option("--action", help="Only these actions; * matches anything, e.g. 'auth.*'")
@click.option("--limit", type=click.IntRange(1, AUDIT_LIMIT_MAX), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON")
@with_data_dir
def audit_command(
    directory: Path, since: int, action: str | None, limit: int, as_json: bool
) -> None:
    """Who changed what, and the security events (bad keys, refused addresses), newest
    first."""
    events = _manage(directory, lambda m: m.store.audit.audit(since, limit, action))
    if as_json:
        _print_json(events)
        return
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
            shown(event.actor or "-"),
            shown(event.target or "-"),
            shown(event.ip or "-"),
            shown(detail),
        )
    console.print(table)


peers_group = cli_federation.register(main, with_data_dir, require_config, fail, console)
cli_discovery.register(peers_group, with_data_dir, require_config, console)
cli_ledger.register(main, with_data_dir, require_config, fail, console)
cli_network.register(main, console)

if __name__ == "__main__":
    main()
