"""What the key and tenant commands share: the limit and metadata options, validating them as
the admin API validates a body, and showing limits with what was spent of them."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import click
import msgspec
from msgspec import UNSET

from node.admin.management import SpendView
from node.cli.options import (
    MONEY_HELP,
    Decorator,
    combined,
    count_or_none,
    globs_or_none,
    metadata,
    money_or_none,
)
from node.cli.output import fail, when
from node.gateway.policy import PERIODS, Limits
from node.units import amount

T = TypeVar("T")

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

UNCHANGED = "[not given: unchanged]"
# `--cache`'s and `--log`'s words, as the limit's value.
CACHE_CHOICES: dict[str, bool | None] = {"on": True, "off": False, "inherit": None}


def meta_option(*, on_update: bool = False) -> Decorator:
    what = "replaces all metadata" if on_update else "repeatable"
    return click.option(
        "--meta",
        multiple=True,
        callback=metadata,
        metavar="KEY=VALUE",
        help=f"Metadata, repeatable ({what})" + (f" {UNCHANGED}" if on_update else ""),
    )


def limit_options(*, on_update: bool = False) -> Decorator:
    """The limit options of `keys create` / `tenants create`, or of their `update`, where an
    option not given leaves its value as it is (help says so instead of a default)."""

    def default(text: str) -> str:
        return UNCHANGED if on_update else f"[default: {text}]"

    return combined(
        click.option(
            "--models",
            callback=globs_or_none,
            help="Comma-separated model names or globs, e.g. 'gpt-4o*,llama3'; none: every "
            f"model {default('every model')}",
        ),
        click.option(
            "--budget",
            callback=money_or_none,
            metavar="AMOUNT",
            help=f"Spend cap per period: {MONEY_HELP}; none: no cap {default('no cap')}",
        ),
        click.option(
            "--period",
            type=click.Choice(PERIODS),
            help=f"Budget period {default('monthly')}",
        ),
        click.option(
            "--rpm",
            callback=count_or_none,
            metavar="N",
            help=f"Requests per minute; none: no limit {default('no limit')}",
        ),
        click.option(
            "--tpm",
            callback=count_or_none,
            metavar="N",
            help=f"Tokens per minute; none: no limit {default('no limit')}",
        ),
        click.option(
            "--max-parallel",
            callback=count_or_none,
            metavar="N",
            help=f"Requests in flight at once; none: no limit {default('no limit')}",
        ),
        click.option(
            "--cache",
            type=click.Choice(CACHE_CHOICES),
            help="The response cache: on, off, or inherit (the tenant's, else the config's "
            f"[cache] models) {default('inherit')}",
        ),
        click.option(
            "--log",
            type=click.Choice(CACHE_CHOICES),
            help="Interaction logs (request and answer bodies): on, off, or inherit (the "
            f"tenant's; off if it says nothing) {default('inherit')}",
        ),
    )


def limit_fields(
    models: Any,
    budget: Any,
    period: str | None,
    rpm: Any,
    tpm: Any,
    max_parallel: Any,
    cache: str | None = None,
    log: str | None = None,
) -> dict[str, Any]:
    """The limit options as KeyInput / TenantInput fields."""
    return {
        "models": models,
        "budget_micros": budget,
        "budget_period": UNSET if period is None else period,
        "rpm": rpm,
        "tpm": tpm,
        "max_parallel": max_parallel,
        "cache": UNSET if cache is None else CACHE_CHOICES[cache],
        "log": UNSET if log is None else CACHE_CHOICES[log],
    }


def spec(kind: type[T], fields: dict[str, Any]) -> T:
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
        field = at.group(1)
        option = OPTION_OF_FIELD.get(field, "--" + field.replace("_", "-"))
        fail(f"{option}: {message[: at.start()]}")


def nothing_to_change(fields: dict[str, Any]) -> bool:
    return all(value is UNSET for value in fields.values())


def models_text(limits: Limits) -> str:
    return "all" if limits.models is None else ", ".join(limits.models) or "(none)"


def budget_text(limits: Limits, spend: SpendView | None, currency: str) -> str:
    if limits.budget_micros is None:
        return "-"
    spent = spend.spent_micros if spend else 0
    budget = amount(limits.budget_micros, currency)
    return f"{amount(spent, currency)} / {budget} {limits.budget_period}"


def rate_text(limits: Limits) -> str:
    rpm = "-" if limits.rpm is None else str(limits.rpm)
    tpm = "-" if limits.tpm is None else str(limits.tpm)
    return f"{rpm} / {tpm}"


def parallel_text(limits: Limits) -> str:
    return "-" if limits.max_parallel is None else str(limits.max_parallel)


def cache_text(limits: Limits) -> str:
    return {True: "on", False: "off", None: "inherit"}[limits.cache]


def limit_rows(limits: Limits, spend: SpendView | None, currency: str) -> list[tuple[str, str]]:
    rows = [
        ("models", models_text(limits)),
        ("budget", budget_text(limits, spend, currency)),
        ("rpm / tpm", rate_text(limits)),
        ("max parallel", parallel_text(limits)),
        ("cache", cache_text(limits)),
        ("interaction log", {True: "on", False: "off", None: "inherit"}[limits.log]),
    ]
    if spend is not None:
        rows.append(("reserved", amount(spend.reserved_micros, currency)))
        rows.append(("resets", when(spend.resets_at)))
    return rows
