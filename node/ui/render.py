"""Rendering the dashboard's pages: one Jinja2 environment over the package's templates,
autoescaped, and the filters that show amounts, times and token counts."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import jinja2
from litestar import Response

from node.units import amount

HTML = "text/html"

NONE = "\N{EN DASH}"  # what a table shows for no value

_environment = jinja2.Environment(
    loader=jinja2.PackageLoader("node.ui", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def money(micros: int | None, currency: str = "USD") -> str:
    return NONE if micros is None else amount(micros, currency)


def units(micros: int | None) -> str:
    """Micro-units as a plain decimal number (what a form field shows and takes)."""
    return "" if micros is None else f"{Decimal(micros).scaleb(-6).normalize():f}"


def when(seconds: int | float | None) -> str:
    if not seconds:
        return NONE
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def when_ms(ms: int | None) -> str:
    return when(ms / 1000 if ms else None)


def count(value: int | None) -> str:
    return NONE if value is None else f"{value:,}"


def percent(part: int, whole: int | None) -> int:
    if not whole:
        return 0
    return max(0, min(100, round(100 * part / whole)))


_environment.filters.update(
    money=money, units=units, when=when, when_ms=when_ms, count=count, percent=percent
)


def page(template: str, status: int = 200, **context: Any) -> Response[str]:
    """A page; never cached (it shows a signed-in admin's data)."""
    html = _environment.get_template(template).render(**context)
    return Response(
        html, status_code=status, media_type=HTML, headers={"cache-control": "no-store"}
    )
