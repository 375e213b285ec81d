"""Usage receipts: what a provider served a consumer, signed by both (DESIGN.md).

`Receipt {v, id, provider, consumer, key_id, model, tokens_in, tokens_out, amount, price_seq,
iat, seq, prev, sig, csig}`. The provider signs it (`sig`, over the canonical object without
`sig` and `csig`); the consumer countersigns it (`csig`, over the same bytes plus `sig`). Both
are `ledger.records` signatures: there is no second scheme here.

`seq` and `prev` chain the receipts of one (provider → consumer) pair: seq 1 has
`prev = GENESIS` (32 zero bytes), and every later receipt's `prev` is `receipt_hash` of the one
before it: sha-256 of the canonical encoding *with* `sig` and *without* `csig`, i.e. exactly the
bytes the consumer countersigns, so both sides can compute it before the countersignature
arrives. Hashes are unpadded base64url (43 characters).

Receipts are verified field for field as received: an unknown version, a float or a bool
where an integer belongs, a negative number, an unknown field, a bad signature or countersig-
nature, or a receipt for someone else is refused with `RecordError`. A receipt of a newer
format must come with a new `v`; v1 has exactly the fields above, so that its hash, computed
from the typed object, is the hash of what was signed.

A node id is its key (`ed25519:` + unpadded base64url of the 32-byte Ed25519 public key), so
`public_key_of` here turns one into the other without importing `federation`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec

from ledger.canonical import b64url, b64url_decode, canonical
from ledger.records import (
    MAX_SKEW,
    RecordError,
    Signer,
    decode_fields,
    sign_struct,
    signed_bytes,
    to_struct,
    verify_fields,
)

VERSION = 1
NODE_ID_PREFIX = "ed25519:"
GENESIS = b64url(bytes(32))
# Integers in signed data stay within what every JSON reader holds exactly (I-JSON, RFC 7493).
MAX_INT = 2**53 - 1

NodeId = Annotated[str, msgspec.Meta(pattern=r"^ed25519:[A-Za-z0-9_-]{43}$")]
Hash = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{43}$")]
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class Receipt(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    v: int = VERSION
    id: Name  # the request id (`aihub-request-id`)
    provider: NodeId
    consumer: NodeId
    key_id: Annotated[str, msgspec.Meta(max_length=256)]  # the cross-node virtual key used
    model: Name
    tokens_in: Count
    tokens_out: Count
    amount: Count  # micro-units
    price_seq: Count  # the advert seq it was priced under
    iat: Count
    seq: Annotated[int, msgspec.Meta(ge=1, le=MAX_INT)]
    prev: Hash
    sig: str = ""
    csig: str = ""


def public_key_of(node_id: str) -> bytes:
    """The 32-byte Ed25519 public key a node id names; RecordError if it is malformed."""
    if not isinstance(node_id, str) or not node_id.startswith(NODE_ID_PREFIX):
        raise RecordError(f"not a node id: {node_id!r}")
    try:
        key = b64url_decode(node_id[len(NODE_ID_PREFIX) :])
    except ValueError as exc:
        raise RecordError(f"not a node id: {node_id!r}") from exc
    if len(key) != 32:
        raise RecordError("a node id must name a 32-byte Ed25519 key")
    return key


def node_id_of(public_key: bytes) -> str:
    return NODE_ID_PREFIX + b64url(bytes(public_key))


def receipt_fields(r: Receipt) -> dict[str, Any]:
    """The receipt as the plain JSON fields it is signed and sent as."""
    return msgspec.to_builtins(r)


def receipt_hash(r: Receipt) -> str:
    """sha-256 of the canonical receipt with `sig` and without `csig`, unpadded base64url:
    the `prev` of the next receipt in its chain."""
    return b64url(hashlib.sha256(signed_bytes(receipt_fields(r), "csig")).digest())


def _as_fields(data: bytes | str | Mapping[str, Any] | Receipt) -> dict[str, Any]:
    if isinstance(data, Receipt):
        return receipt_fields(data)
    if isinstance(data, bytes | str):
        return decode_fields(data)
    if isinstance(data, Mapping):
        return dict(data)
    raise RecordError("a receipt must be a JSON object")


def parse_receipt(data: bytes | str | Mapping[str, Any] | Receipt) -> Receipt:
    """A receipt checked for form only (version, types, bounds, no floats, no unknown
    fields); signatures are not checked. `verify_receipt` is what a receiver calls."""
    fields = _as_fields(data)
    version = fields.get("v")
    if type(version) is not int or version != VERSION:
        raise RecordError(f"unsupported receipt version {version!r}")
    # Flat objects: a float anywhere deeper fails the types below.
    if any(isinstance(value, float) for value in fields.values()):
        raise RecordError("signed data may not contain floats")
    receipt = to_struct(fields, Receipt)
    if receipt.provider == receipt.consumer:
        raise RecordError("a receipt's provider and consumer must differ")
    return receipt


def verify_receipt(
    data: bytes | str | Mapping[str, Any] | Receipt,
    provider_key: bytes,
    *,
    consumer: str | None = None,
    now: float | None = None,
) -> Receipt:
    """A receipt signed by `provider_key` (which must be the key its `provider` names), for
    `consumer` if given, not issued more than 5 minutes in the future; if it carries a
    countersignature, that must be the consumer's. RecordError otherwise."""
    fields = _as_fields(data)
    receipt = parse_receipt(fields)
    if public_key_of(receipt.provider) != bytes(provider_key):
        raise RecordError("receipt is not from the expected provider")
    if consumer is not None and receipt.consumer != consumer:
        raise RecordError("receipt is for another consumer")
    verify_fields(fields, provider_key, "sig")
    if receipt.csig:
        verify_fields(fields, public_key_of(receipt.consumer), "csig")
    if receipt.iat > (time.time() if now is None else now) + MAX_SKEW:
        raise RecordError("receipt issued in the future (clock skew over 5 minutes)")
    return receipt


def make_receipt(
    sign: Signer,
    *,
    id: str,
    provider: str,
    consumer: str,
    key_id: str,
    model: str,
    tokens_in: int,
    tokens_out: int,
    amount: int,
    price_seq: int,
    seq: int,
    prev: str,
    iat: int | None = None,
) -> Receipt:
    """A receipt signed by the provider (`sign` is the provider's signer). ValueError for a
    receipt a receiver would refuse (negative amount, float, seq 0, ...)."""
    return signed_receipt(
        sign,
        id=id,
        provider=provider,
        consumer=consumer,
        key_id=key_id,
        model=model,
        tokens_in=tokens_in,
        tokens_out=tokens_out,
        amount=amount,
        price_seq=price_seq,
        seq=seq,
        prev=prev,
        iat=iat,
    )[0]


def signed_receipt(sign: Signer, *, iat: int | None = None, **terms: Any) -> tuple[Receipt, bytes]:
    """`make_receipt`, and the receipt's bytes as sent and stored (canonical, with `sig`,
    without `csig`: what its hash and a countersignature cover), made from one conversion of
    its fields rather than one per use."""
    terms["iat"] = int(time.time()) if iat is None else iat
    # Never sign what a receiver would refuse: converted (not constructed), the terms meet
    # every type and bound `parse_receipt` checks (an int field takes no float or bool), in
    # the one conversion the receipt is made by.
    try:
        receipt = to_struct(terms, Receipt)
    except RecordError as exc:
        raise ValueError(str(exc)) from exc
    if receipt.v != VERSION:
        raise ValueError(f"unsupported receipt version {receipt.v!r}")
    if receipt.provider == receipt.consumer:
        raise ValueError("a receipt's provider and consumer must differ")
    fields = receipt_fields(receipt)
    del fields["csig"]
    fields["sig"] = b64url(sign(signed_bytes(fields, "sig")))
    return msgspec.structs.replace(receipt, sig=fields["sig"]), canonical(fields)


def countersign(r: Receipt, sign: Signer) -> Receipt:
    """The receipt with the consumer's countersignature (`sign` is the consumer's signer).
    The caller verifies the receipt first (`verify_receipt`)."""
    if not r.sig:
        raise ValueError("cannot countersign a receipt the provider has not signed")
    return sign_struct(r, sign, "csig")


def verify_countersignature(r: Receipt, consumer_key: bytes) -> None:
    """RecordError unless `r.csig` is the signature of `consumer_key`, the key the receipt's
    `consumer` names, over the provider-signed receipt."""
    if public_key_of(r.consumer) != bytes(consumer_key):
        raise RecordError("countersignature key is not the receipt's consumer")
    if not r.csig:
        raise RecordError("receipt is not countersigned")
    verify_fields(receipt_fields(r), consumer_key, "csig")


def _countersigned_by(r: Receipt, me: str) -> bool:
    try:
        verify_countersignature(r, public_key_of(me))
    except (RecordError, ValueError):
        return False
    return True


MICROS_PER_MILLION_TOKENS = 1_000_000


class SentRequest(msgspec.Struct, frozen=True):
    """What a consumer recorded of a request it routed to a peer: the only thing a receipt
    may bill it for (DESIGN.md, "Who may hand a node a receipt")."""

    id: str  # the `aihub-request-id` it sent
    peer: str  # the provider's node id
    model: str  # the model it asked that provider for
    price_seq: int  # the advert seq of the provider's it was priced under
    price_in: int  # that advert's prices, micros per 1M tokens
    price_out: int
    status: int = 200  # how the request ended at the consumer (200: the answer reached it)


def price_of(tokens_in: int, tokens_out: int, price_in: int, price_out: int) -> int:
    """Micro-units for the tokens at these prices, rounded up (as a provider bills them)."""
    numerator = tokens_in * price_in + tokens_out * price_out
    return -(-numerator // MICROS_PER_MILLION_TOKENS)


class UnseenAdvert(RecordError):
    """A receipt priced under an advert seq of its provider's that we do not hold (yet: a
    provider takes a new seq when it restarts; fetching its advert may show it)."""


def take_receipt(
    data: bytes | str | Mapping[str, Any] | Receipt,
    *,
    me: str,
    sender: str,
    sent: SentRequest | None,
    advert_seq: int = 0,
    now: float | None = None,
) -> Receipt:
    """The receipt, if node `me` may take it from `sender`; RecordError saying why not.

    A node takes a receipt only as its consumer, from the provider that signed it (the
    sender is the provider), for a request it sent that provider (`sent`, found by the
    receipt's id): the same model, priced under an advert seq of the provider's that it
    holds (no later than the newest it holds, `advert_seq`, or the one the request was
    routed under: a provider cannot cite an advert it never issued), and charging no more
    than the receipt's tokens cost at the prices the request was routed under (what the
    consumer agreed to when it sent it)."""
    receipt = verify_receipt(data, public_key_of(sender), consumer=me, now=now)
    check_billing(receipt, me=me, sender=sender, sent=sent, advert_seq=advert_seq)
    return receipt


def check_billing(
    receipt: Receipt, *, me: str, sender: str, sent: SentRequest | None, advert_seq: int = 0
) -> None:
    """`take_receipt` but for the signatures: RecordError unless `receipt` bills `me` for
    `sent`, a request it sent `sender`, as it asked and priced it. For receipts whose
    signatures were checked on the way in."""
    if receipt.consumer != me or receipt.provider != sender:
        raise RecordError("receipt is not from this provider to us")
    if sent is None:
        if _countersigned_by(receipt, me):
            # We took it before and countersigned it; a restored backup lost our record of
            # the request. No one but us can make that signature: it is the record.
            return
        raise RecordError(f"receipt {receipt.id!r} names no request we sent")
    if sent.id != receipt.id or sent.peer != sender:
        raise RecordError(f"receipt {receipt.id!r} names a request we sent another node")
    if receipt.model != sent.model:
        raise RecordError(f"receipt is for model {receipt.model!r}, we asked for {sent.model!r}")
    held = max(sent.price_seq, advert_seq)
    if receipt.price_seq > held:
        raise UnseenAdvert(
            f"receipt is priced under advert seq {receipt.price_seq}, after the newest we hold"
            f" ({held})"
        )
    fair = price_of(receipt.tokens_in, receipt.tokens_out, sent.price_in, sent.price_out)
    if receipt.amount > fair:
        raise RecordError(
            f"receipt charges {receipt.amount}, more than its tokens cost at the advertised"
            f" prices ({fair})"
        )
