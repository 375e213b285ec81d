"""Statement statements: both nodes of a pair sign the totals of a closed period (DESIGN.md).

`Statement {v, a, b, from_seq, to_seq, head_a_to_b, head_b_to_a, a_owes_b, b_owes_a, net,
iat, sig_a, sig_b}`. The two nodes are ordered, `a < b` (node ids compared as strings), so
that a pair has one statement form. "a→b" is the chain of receipts where `a` was the provider
and `b` the consumer (`b` owes `a` for those); "b→a" the other way.

A statement covers one period, and the amounts are that period's, not running totals:

- `from_seq`..`to_seq` is the (inclusive) seq range of the a→b chain the period covers:
  `from_seq` is 1 for the first statement of a pair and the previous statement's `to_seq + 1`
  after that; `to_seq` is the seq of the last a→b receipt covered. A period with no a→b
  receipts has `to_seq = from_seq - 1`.
- `head_a_to_b` / `head_b_to_a` are the chain heads at the end of the period: the
  `receipt_hash` of the last receipt covered in each direction, carried over from the
  previous statement where a period has none in that direction, `GENESIS` while a chain is
  still empty. They are the checkpoint later verification and reconciliation start from
  (`verify_chain(start_seq=to_seq + 1, start_prev=head_a_to_b)`).
- The b→a chain's seq range is not in the format: the period covers the b→a receipts after
  the previous statement's `head_b_to_a` (from seq 1 if none) up to and including the
  receipt whose hash is `head_b_to_a`. Both ends are fixed by the hashes, which link by
  `prev`, so the range is just as unambiguous; its seqs are those receipts' own.
- `a_owes_b` is the sum of the amounts of the b→a receipts covered (b provided, a consumed),
  `b_owes_a` that of the a→b receipts, and `net = a_owes_b - b_owes_a` (positive: a owes b).

Both signatures (`sig_a`, `sig_b`) cover the same bytes (the statement without either); a
statement counts only with both. Statements carry no `exp`: a closed period does not go stale.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec

from ledger.chain import verify_chain
from ledger.receipts import (
    GENESIS,
    MAX_INT,
    Hash,
    NodeId,
    Receipt,
    public_key_of,
)
from ledger.records import (
    MAX_SKEW,
    RecordError,
    Signer,
    decode_fields,
    sign_struct,
    to_struct,
    verify_fields,
)

VERSION = 1

Amount = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)]


class Statement(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    v: int = VERSION
    a: NodeId
    b: NodeId
    from_seq: Annotated[int, msgspec.Meta(ge=1, le=MAX_INT)]
    to_seq: Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)]
    head_a_to_b: Hash
    head_b_to_a: Hash
    a_owes_b: Amount
    b_owes_a: Amount
    net: Annotated[int, msgspec.Meta(ge=-MAX_INT, le=MAX_INT)]
    iat: Amount
    sig_a: str = ""
    sig_b: str = ""


def _fields(data: Statement | bytes | str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(data, Statement):
        return msgspec.to_builtins(data)
    if isinstance(data, bytes | str):
        return decode_fields(data)
    if isinstance(data, Mapping):
        return dict(data)
    raise RecordError("a settlement statement must be a JSON object")


def parse_statement(data: Statement | bytes | str | Mapping[str, Any]) -> Statement:
    """A statement checked for form only (version, types, no floats, no unknown fields,
    a < b, a consistent seq range and net); signatures are not checked."""
    fields = _fields(data)
    version = fields.get("v")
    if type(version) is not int or version != VERSION:
        raise RecordError(f"unsupported settlement version {version!r}")
    # Flat objects: a float anywhere deeper fails the types below.
    if any(isinstance(value, float) for value in fields.values()):
        raise RecordError("signed data may not contain floats")
    s = to_struct(fields, Statement)
    if not s.a < s.b:
        raise RecordError("a settlement's `a` must sort before its `b`")
    if s.to_seq < s.from_seq - 1:
        raise RecordError("`to_seq` is before `from_seq`")
    if s.net != s.a_owes_b - s.b_owes_a:
        raise RecordError("`net` is not `a_owes_b - b_owes_a`")
    return s


@dataclass
class Period:
    """One chain's receipts of a period, taken a page at a time (`add`, in seq order): each
    page checked to continue the last (form and links; signatures are not checked), the
    amounts summed, and only the head kept, so a period of any length takes the memory of a
    page. `start_seq` None: the period starts wherever its first receipt is (the b→a chain
    after a previous head, whose seq the format does not carry)."""

    provider_key: bytes
    consumer_key: bytes
    start_seq: int | None
    head: tuple[int, str]  # (seq, hash) of the last receipt taken, or where the period starts
    count: int = 0
    amount: int = 0

    def add(self, receipts: Sequence[Receipt]) -> None:
        """ValueError if `receipts` are not the unbroken continuation of the chain."""
        if not receipts:
            return
        start = self.start_seq if self.count == 0 else self.head[0] + 1
        report = verify_chain(
            receipts,
            self.provider_key,
            self.consumer_key,
            start_seq=receipts[0].seq if start is None else start,
            start_prev=self.head[1],
            check_signatures=False,
        )
        if not report:
            raise ValueError(
                "receipts are not the continuation of the chain: receipt"
                f" #{self.count + (report.index or 0)} (seq {report.seq}): {report.problem}:"
                f" {report.detail}"
            )
        self.count += len(receipts)
        self.amount += sum(r.amount for r in receipts)
        self.head = report.head


def open_periods(a: str, b: str, *, previous: Statement | None) -> tuple[Period, Period]:
    """The a→b and b→a periods after `previous` (the pair's last statement; None for the
    first), empty: add each chain's receipts after it, then make the statement
    (`period_statement`). ValueError if a >= b or `previous` is of another pair."""
    if not a < b:
        raise ValueError("`a` must sort before `b` (node ids compared as strings)")
    if previous is not None and (previous.a, previous.b) != (a, b):
        raise ValueError("the previous statement is of another pair")
    from_seq = previous.to_seq + 1 if previous is not None else 1
    start_ab = previous.head_a_to_b if previous is not None else GENESIS
    start_ba = previous.head_b_to_a if previous is not None else GENESIS
    key_a, key_b = public_key_of(a), public_key_of(b)
    # The b→a range starts wherever the previous head left it; the prev link fixes it.
    ba_start: int | None = 1 if start_ba == GENESIS else None
    return (
        Period(key_a, key_b, from_seq, (from_seq - 1, start_ab)),
        Period(key_b, key_a, ba_start, (0, start_ba)),
    )


def period_statement(
    a_to_b: Period, b_to_a: Period, a: str, b: str, *, now: float | None = None
) -> Statement:
    """The unsigned statement of a period whose receipts were all added to `a_to_b` and
    `b_to_a` (from `open_periods`). ValueError if it would not be a valid statement."""
    statement = Statement(
        a=a,
        b=b,
        from_seq=a_to_b.start_seq if a_to_b.start_seq is not None else 1,
        to_seq=a_to_b.head[0],
        head_a_to_b=a_to_b.head[1],
        head_b_to_a=b_to_a.head[1],
        a_owes_b=b_to_a.amount,
        b_owes_a=a_to_b.amount,
        net=b_to_a.amount - a_to_b.amount,
        iat=int(time.time() if now is None else now),
    )
    try:
        parse_statement(statement)
    except RecordError as exc:
        raise ValueError(str(exc)) from exc
    return statement


def make_statement(
    a_to_b: Sequence[Receipt],
    b_to_a: Sequence[Receipt],
    a: str,
    b: str,
    *,
    previous: Statement | None,
    now: float | None = None,
) -> Statement:
    """The unsigned statement of a period: `a_to_b` (a provided, b consumed) and `b_to_a`
    are the receipts of each chain after `previous` (the pair's last statement; None for the
    first), in seq order. ValueError if a >= b, if `previous` is of another pair, or if the
    receipts are not the unbroken continuation of each chain (form and links are checked;
    signatures are not: pass receipts as verified on the way in). `Period` takes them a page
    at a time."""
    ab, ba = open_periods(a, b, previous=previous)
    ab.add(a_to_b)
    ba.add(b_to_a)
    return period_statement(ab, ba, a, b, now=now)


def check_statement(
    s: Statement,
    a_to_b: Sequence[Receipt],
    b_to_a: Sequence[Receipt],
    *,
    previous: Statement | None,
) -> None:
    """RecordError unless `s` (say, proposed by the peer) states exactly what our own
    receipts of the period say: the check to make before signing it."""
    try:
        ours = make_statement(a_to_b, b_to_a, s.a, s.b, previous=previous, now=s.iat)
    except ValueError as exc:
        raise RecordError(f"cannot check the statement: {exc}") from exc
    same_statement(s, ours)


def same_statement(s: Statement, ours: Statement) -> None:
    """RecordError unless `s`, signatures aside, is `ours` (made from our own receipts)."""
    unsigned = msgspec.structs.replace(s, sig_a="", sig_b="")
    if unsigned != ours:
        differ = [
            name
            for name in Statement.__struct_fields__
            if getattr(unsigned, name) != getattr(ours, name)
        ]
        raise RecordError(f"statement differs from our receipts in {', '.join(differ)}")


def sign_statement(s: Statement, sign: Signer, side: Literal["a", "b"]) -> Statement:
    """`s` with the signature of `side` added; ValueError if `sign` is not the key that side's
    node id names."""
    if side not in ("a", "b"):
        raise ValueError("side must be 'a' or 'b'")
    try:
        parse_statement(s)
    except RecordError as exc:
        raise ValueError(str(exc)) from exc
    field = f"sig_{side}"
    signed = sign_struct(s, sign, field)
    try:
        verify_fields(msgspec.to_builtins(signed), public_key_of(getattr(s, side)), field)
    except RecordError as exc:
        raise ValueError(f"the signer is not node `{side}` of the statement") from exc
    return signed


def verify_statement(
    s: Statement | bytes | str | Mapping[str, Any],
    key_a: bytes,
    key_b: bytes,
    *,
    now: float | None = None,
) -> None:
    """RecordError unless the statement is well formed, `key_a`/`key_b` are the keys its `a`
    and `b` name, and it carries both valid signatures."""
    fields = _fields(s)
    statement = parse_statement(fields)
    if public_key_of(statement.a) != bytes(key_a) or public_key_of(statement.b) != bytes(key_b):
        raise RecordError("statement is not between the expected nodes")
    if not statement.sig_a or not statement.sig_b:
        raise RecordError("a settlement statement needs the signatures of both nodes")
    verify_fields(fields, key_a, "sig_a")
    verify_fields(fields, key_b, "sig_b")
    if statement.iat > (time.time() if now is None else now) + MAX_SKEW:
        raise RecordError("statement issued in the future (clock skew over 5 minutes)")


def balances(statements: Iterable[Statement]) -> dict[str, int]:
    """Each node's balance over the given statements (positive: it is owed), in micro-units.
    The caller verifies the statements and passes those of the periods still to be paid."""
    result: dict[str, int] = {}
    for s in statements:
        result[s.b] = result.get(s.b, 0) + s.net
        result[s.a] = result.get(s.a, 0) - s.net
    return result
