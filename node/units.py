"""Amounts of money and time as people type them: `20`, `0.5`, `30m`, `7d`, `2025-01-31`.

Shared by the admin API and the CLI, so that both accept exactly the same spellings.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"^(\d+)([smhdw]?)$")


def parse_duration(text: str, *, allow_zero: bool = False) -> int:
    """`30m`, `24h`, `7d`, `2w`, `45s` or plain seconds, as seconds; ValueError otherwise."""
    match = _DURATION_RE.fullmatch(text.strip().lower())
    if not match:
        raise ValueError(f"not a duration: {text!r} (e.g. 30m, 24h, 7d)")
    seconds = int(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]
    if seconds == 0 and not allow_zero:
        raise ValueError(f"a duration must be more than zero: {text!r}")
    return seconds


def parse_since(text: str, now: float | None = None) -> int:
    """The start of a report, in unix milliseconds, from a duration back from now (`7d`,
    `24h`, `30m`), an ISO 8601 date or date-time (UTC unless it says otherwise), or unix
    seconds. ValueError on anything else."""
    text = text.strip()
    now = time.time() if now is None else now
    match = _DURATION_RE.fullmatch(text.lower())
    if match and match.group(2):
        return int((now - parse_duration(text, allow_zero=True)) * 1000)
    if text.isdigit():
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
    0.000001 -> 1. ValueError for a negative amount or more than 6 decimals."""
    try:
        amount = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"not an amount: {text!r} (e.g. 20 or 0.5)") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"an amount is zero or more: {text!r}")
    micros = amount.scaleb(6)
    if micros != micros.to_integral_value():
        raise ValueError(f"an amount has at most 6 decimals: {text!r}")
    return int(micros)


def money(micros: int) -> str:
    """Micro-units as currency with all 6 decimals: 1500000 -> $1.500000."""
    return f"${Decimal(micros).scaleb(-6):.6f}"


def amount(micros: int) -> str:
    """Micro-units as currency, without trailing zeros: 20000000 -> $20, 1 -> $0.000001."""
    return f"${Decimal(micros).scaleb(-6).normalize():f}"
