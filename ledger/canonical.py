"""Canonical encoding of signed objects: msgspec JSON, keys sorted, no whitespace, UTF-8.

Every signed object in aihub (descriptors, invites, adverts, receipts, statements) is encoded
with `canonical` before it is signed or verified, so that two nodes built at different times
produce the same bytes for the same object.
"""

from __future__ import annotations

import base64
from typing import Any

import msgspec

_encoder = msgspec.json.Encoder(order="sorted")


class RecordError(ValueError):
    """A signed object that must be refused; the message says why."""


def canonical(obj: Any) -> bytes:
    """The one byte string an object is signed as; RecordError for text that is not valid
    Unicode (a lone surrogate, which JSON's `\\ud800` escapes can smuggle in)."""
    try:
        return _encoder.encode(obj)
    except UnicodeEncodeError as exc:
        raise RecordError("signed data must be valid Unicode") from exc


def b64url(data: bytes) -> str:
    """Unpadded base64url, as DESIGN.md fixes for signatures and keys."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    """Strict inverse of `b64url`: rejects padding and characters outside the alphabet."""
    if "=" in text or not text.isascii():
        raise ValueError("not unpadded base64url")
    padded = text + "=" * (-len(text) % 4)
    try:
        decoded = base64.urlsafe_b64decode(padded.encode())
    except (ValueError, TypeError) as exc:
        raise ValueError("not unpadded base64url") from exc
    if b64url(decoded) != text:
        raise ValueError("not canonical base64url")
    return decoded
