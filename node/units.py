"""Amounts of money and time as people type them: `20`, `0.5`, `30m`, `7d`, `2025-01-31`.

Shared by the admin API and the CLI, so that both accept exactly the same spellings.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# ASCII digits only: `\d` and str.isdigit() also take other scripts' digits and `²`.
_DURATION_RE = re.compile(r"^(\d+)([smhdw]?)$", re.ASCII)
_UNIX_RE = re.compile(r"^\d+$", re.ASCII)
# Bounds that keep every amount and moment within what the store (64-bit integers) and
# `datetime` can hold: a duration of at most 100 years, a moment before the year 10000, an
# amount of at most a billion currency units.
MAX_DURATION = 100 * 365 * 86400
MAX_UNIX = 253402300799  # 9999-12-31T23:59:59Z
MAX_MONEY_MICROS = 10**15


def parse_duration(text: str, *, allow_zero: bool = False) -> int:
    """`30m`, `24h`, `7d`, `2w`, `45s` or plain seconds, as seconds, up to 100 years;
    ValueError otherwise."""
    match = _DURATION_RE.fullmatch(text.strip().lower())
    if not match:
        raise ValueError(f"not a duration: {text!r} (e.g. 30m, 24h, 7d)")
    digits, unit = match.groups()
    if len(digits) > 12:
        raise ValueError(f"a duration is at most 100 years: {text!r}")
    seconds = int(digits) * DURATION_UNITS[unit or "s"]
    if seconds > MAX_DURATION:
        raise ValueError(f"a duration is at most 100 years: {text!r}")
    if seconds == 0 and not allow_zero:
        raise ValueError(f"a duration must be more than zero: {text!r}")
    return seconds


def parse_since(text: str, now: float | None = None) -> int:
    """The start of a report, in unix milliseconds, from a duration back from now (`7d`,
    `24h`, `30m`), an ISO 8601 date or date-time (UTC unless it says otherwise), or unix
    seconds before the year 10000. ValueError on anything else."""
    text = text.strip()
    now = time.time() if now is None else now
    match = _DURATION_RE.fullmatch(text.lower())
    if match and match.group(2):
        return int((now - parse_duration(text, allow_zero=True)) * 1000)
    if _UNIX_RE.fullmatch(text):
        if len(text) > 12 or int(text) > MAX_UNIX:
            raise ValueError(f"a unix time is before the year 10000: {text!r}")
        return int(text) * 1000
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"not a duration, date or unix time: {text!r} (e.g. 7d, 24h, 2025-01-31)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def parse_money(text: str) -> int:
    """Currency units (e.g. dollars) to integer micro-units, exactly: 20 -> 20_000_000,
    0.000001 -> 1. ValueError for a negative amount, more than 6 decimals, or more than a
    billion."""
    try:
        amount = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"not an amount: {text!r} (e.g. 20 or 0.5)") from None
    if not amount.is_finite():
        raise ValueError(f"not an amount: {text!r} (e.g. 20 or 0.5)")
    if amount < 0:
        raise ValueError(f"an amount is zero or more: {text!r}")
    # Compared before scaling: `1e999999999` must not become a billion-digit integer.
    if amount > Decimal(MAX_MONEY_MICROS).scaleb(-6):
        raise ValueError(f"an amount is at most {MAX_MONEY_MICROS // 10**6}: {text!r}")
    micros = amount.scaleb(6)
    if micros != micros.to_integral_value():
        raise ValueError(f"an amount has at most 6 decimals: {text!r}")
    return int(micros)


# How an amount is shown in the node's currency (`node.currency`); another code follows it.
_SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£"}


def _in(currency: str, number: str) -> str:
    symbol = _SYMBOLS.get(currency)
    return f"{symbol}{number}" if symbol else f"{number} {currency}"


def money(micros: int, currency: str = "USD") -> str:
    """Micro-units as currency with all 6 decimals: 1500000 -> $1.500000 (in EUR €1.500000,
    in CHF 1.500000 CHF)."""
    return _in(currency, f"{Decimal(micros).scaleb(-6):.6f}")


def amount(micros: int, currency: str = "USD") -> str:
    """Micro-units as currency, without trailing zeros: 20000000 -> $20, 1 -> $0.000001."""
    return _in(currency, f"{Decimal(micros).scaleb(-6).normalize():f}")
