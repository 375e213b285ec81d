"""Signed records: the one way every signed object in aihub is signed and verified.

A record is a JSON object encoded canonically (`ledger.canonical`). Its signature sits in a
field (`sig`, unpadded base64url) computed over the canonical encoding of the object without
its signature fields (a receipt's countersignature `csig` covers the bytes with `sig`).
Verification works on the object as received, field for field, so a signer's fields are
checked even where the receiver's types do not name them; only then is it converted to a
typed Struct.

Signed data carries integers only (no floats), a format version `v`, `iat`, and where it can
go stale `exp`; receivers reject unknown versions, expired objects and clock skew over 5 min.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import msgspec
import nacl.exceptions
import nacl.signing

from ledger.canonical import RecordError as RecordError  # raised by the encoding itself
from ledger.canonical import b64url, b64url_decode, canonical
from ledger.nesting import bounded

MAX_SKEW = 300
# Each signature field, and the other signature fields its bytes include: a receipt's
# consumer countersigns (`csig`) the provider's signed bytes with `sig`; both sides of a
# settlement statement sign the same totals.
COVERS: dict[str, tuple[str, ...]] = {"sig": (), "csig": ("sig",), "sig_a": (), "sig_b": ()}

S = TypeVar("S", bound=msgspec.Struct)
Signer = Callable[[bytes], bytes]


def _floats_in(value: Any) -> bool:
    kind = type(value)
    if kind is float:
        return True
    if kind is str or kind is int or value is None:  # most values: no ABC check needed
        return False
    if kind is dict:  # what a record's fields are: checked without an ABC check either
        items: Iterable[Any] = value.values()
    elif isinstance(value, float):
        return True
    elif isinstance(value, Mapping):
        items = value.values()
    elif isinstance(value, list | tuple):
        items = value
    else:
        return False
    for item in items:
        # A record's fields are mostly strings and integers: skipped without a call each.
        if type(item) is not str and type(item) is not int and _floats_in(item):
            return True
    return False


def signed_bytes(fields: Mapping[str, Any], field: str = "sig") -> bytes:
    """The bytes that the signature in `field` covers: the canonical object without its
    signature fields, but for those `field` countersigns."""
    covered = COVERS.get(field, ())
    payload = {k: v for k, v in fields.items() if k not in COVERS or k in covered}
    if _floats_in(payload):
        raise RecordError("signed data may not contain floats")
    return canonical(payload)


def sign_fields(fields: dict[str, Any], sign: Signer, field: str = "sig") -> dict[str, Any]:
    return {**fields, field: b64url(sign(signed_bytes(fields, field)))}


def verify_fields(fields: Mapping[str, Any], public_key: bytes, field: str = "sig") -> None:
    signature = fields.get(field)
    if not isinstance(signature, str):
        raise RecordError(f"missing signature `{field}`")
    try:
        covered = signed_bytes(fields, field)
    except ValueError as exc:
        raise RecordError(f"bad signature `{field}`") from exc
    verify_bytes(covered, signature, public_key, field)


def verify_bytes(covered: bytes, signature: str, public_key: bytes, field: str = "sig") -> None:
    """RecordError unless `signature` (unpadded base64url) is `public_key`'s signature of
    `covered`: for a caller that holds the covered bytes already (its own stored copy of a
    record), so that they are neither decoded nor encoded again."""
    try:
        raw = b64url_decode(signature)
        nacl.signing.VerifyKey(public_key).verify(covered, raw)
    except (ValueError, nacl.exceptions.BadSignatureError) as exc:
        raise RecordError(f"bad signature `{field}`") from exc


def check_fresh(
    fields: Mapping[str, Any],
    *,
    version: int,
    now: float | None = None,
    require_exp: bool = True,
) -> None:
    """Version, issue time within the allowed skew, and expiry."""
    now = time.time() if now is None else now
    if fields.get("v") != version:
        raise RecordError(f"unsupported version {fields.get('v')!r}")
    iat, exp = fields.get("iat"), fields.get("exp")
    if not isinstance(iat, int) or isinstance(iat, bool):
        raise RecordError("missing or invalid `iat`")
    if iat > now + MAX_SKEW:
        raise RecordError("issued in the future (clock skew over 5 minutes)")
    if exp is None and not require_exp:
        return
    if not isinstance(exp, int) or isinstance(exp, bool):
        raise RecordError("missing or invalid `exp`")
    if exp + MAX_SKEW < now:
        raise RecordError("expired")


def sign_struct(obj: S, sign: Signer, field: str = "sig") -> S:
    """A copy of `obj` with `field` set to its signature."""
    fields = msgspec.to_builtins(obj)
    fields.pop(field, None)
    signed = sign_fields(fields, sign, field)
    return msgspec.structs.replace(obj, **{field: signed[field]})


def decode_fields(data: bytes | str) -> dict[str, Any]:
    try:
        fields = msgspec.json.decode(bounded(data))
    except UnicodeDecodeError as exc:
        raise RecordError(f"not valid UTF-8 (byte {exc.start})") from exc
    except msgspec.DecodeError as exc:
        raise RecordError(f"not JSON: {exc}") from exc
    if not isinstance(fields, dict):
        raise RecordError("a signed record must be a JSON object")
    return fields


def to_struct(fields: Mapping[str, Any], kind: type[S]) -> S:
    try:
        return msgspec.convert(fields, kind)
    except msgspec.ValidationError as exc:
        raise RecordError(f"invalid {kind.__name__}: {exc}") from exc
