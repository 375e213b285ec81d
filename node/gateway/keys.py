"""Key format and keyed hashing.

A key reads `sk-hub-<id>_<secret>`: the 12-hex-digit public id finds the record, and only a
keyed BLAKE2b hash of the whole key is stored, so a leaked database reveals no usable key and
cannot be brute-forced without the node's identity file as well.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

KEY_PREFIX = "sk-hub-"
_KEY_RE = re.compile(r"^sk-hub-([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
HASH_PURPOSE = b"aihub-key-hash"


def generate_key() -> tuple[str, str]:
    """A new (key, key id)."""
    key_id = secrets.token_hex(6)
    return f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}", key_id


def key_id_of(key: str) -> str | None:
    """The public id inside a well-formed key, or None."""
    match = _KEY_RE.fullmatch(key)
    return match.group(1) if match else None


def hash_key(secret: bytes, key: str) -> bytes:
    # `surrogatepass`: a command-line argument can carry lone surrogates (undecodable bytes);
    # such a key is never valid, but hashing it must not raise. Valid text encodes as before.
    return hashlib.blake2b(
        key.encode("utf-8", "surrogatepass"), key=secret, digest_size=32
    ).digest()


def hashes_match(stored: bytes, secret: bytes, key: str) -> bool:
    return hmac.compare_digest(stored, hash_key(secret, key))


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer …` header (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
