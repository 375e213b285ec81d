"""Hash chains of receipts: one chain per (provider → consumer) pair, in seq order.

Receipt `seq` n+1 carries in `prev` the `receipt_hash` of receipt n; seq 1 carries `GENESIS`.
`verify_chain` re-checks every receipt (form, the provider's signature, the countersignature
where there is one) and every link, and names the first broken one: its index in the
sequence given, its seq and what is wrong (`Problem`). Checks on a receipt run in this order,
so that the name is the most precise one:

1. malformed — wrong version or types (a float, a bool, a negative number, ...);
2. bad signature — not signed by the key its `provider` names (a changed field lands here);
3. wrong pair — an authentic receipt, but of another chain;
4. seq gap / seq disorder — seq above the next expected (a receipt missing) / at or below
   the last one (a duplicate, a swap);
5. prev mismatch — `prev` is not the hash of the receipt before;
6. bad countersignature / missing countersignature — the latter only with `require_csig`;
7. after the last receipt: truncated / head mismatch — only with `expect_head`.

A chain may start after a settlement (`start_seq`, `start_prev` = the statement's head). A
chain cut short at its end is a valid shorter chain unless the expected head is known: pass
it as `expect_head` (e.g. from a settlement statement or the peer's reconciliation) to detect that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from ledger.receipts import (
    GENESIS,
    Receipt,
    node_id_of,
    parse_receipt,
    public_key_of,
    receipt_fields,
    receipt_hash,
)
from ledger.records import RecordError, verify_fields


class Problem(StrEnum):
    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad signature"
    WRONG_PAIR = "wrong pair"
    SEQ_GAP = "seq gap"
    SEQ_DISORDER = "seq disorder"
    PREV_MISMATCH = "prev mismatch"
    BAD_COUNTERSIGNATURE = "bad countersignature"
    MISSING_COUNTERSIGNATURE = "missing countersignature"
    TRUNCATED = "truncated"
    HEAD_MISMATCH = "head mismatch"


@dataclass(frozen=True)
class ChainReport:
    """The outcome of `verify_chain`. When not `ok`: `index` is the position in the sequence
    given of the first broken receipt (for TRUNCATED: the length, where the next one is
    missing), `seq` its seq field as stored, `expected_seq` the seq that belonged there,
    `problem` what is wrong and `detail` a sentence for people. `head` is the (seq, hash) of
    the last receipt that checked out (`start_seq - 1, start_prev` if none); `checked` how
    many did."""

    ok: bool
    checked: int
    head: tuple[int, str]
    index: int | None = None
    seq: int | None = None
    expected_seq: int | None = None
    problem: Problem | None = None
    detail: str = ""

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        if self.ok:
            return f"ok: {self.checked} receipts, head seq {self.head[0]}"
        return f"receipt #{self.index} (seq {self.seq}): {self.problem}: {self.detail}"


def head(receipts: Sequence[Receipt]) -> tuple[int, str]:
    """The last receipt's seq and hash; (0, GENESIS) for no receipts."""
    if not receipts:
        return 0, GENESIS
    return receipts[-1].seq, receipt_hash(receipts[-1])


def verify_chain(
    receipts: Sequence[Receipt],
    provider_key: bytes,
    consumer_key: bytes | None = None,
    *,
    start_seq: int = 1,
    start_prev: str = GENESIS,
    expect_head: tuple[int, str] | None = None,
    require_csig: bool = False,
    check_signatures: bool = True,
) -> ChainReport:
    """Check one (provider → consumer) chain, in seq order, starting at `start_seq` with
    `prev == start_prev`. Without `consumer_key` the consumer is the first receipt's and
    countersignatures are not checked; with it, every countersignature present is checked
    (and, with `require_csig`, must be present). `expect_head`, if given, is the (seq, hash) the
    chain must end at. `check_signatures=False` checks form and links only (for receipts
    already verified on the way in)."""
    provider = node_id_of(provider_key)
    consumer = node_id_of(consumer_key) if consumer_key is not None else None
    expected_seq, expected_prev = start_seq, start_prev

    def broken(index: int, seq: object, problem: Problem, detail: str) -> ChainReport:
        return ChainReport(
            ok=False,
            checked=index,
            head=(expected_seq - 1, expected_prev),
            index=index,
            seq=seq if isinstance(seq, int) else None,
            expected_seq=expected_seq,
            problem=problem,
            detail=detail,
        )

    for index, stored in enumerate(receipts):
        try:
            fields = receipt_fields(stored)
            receipt = parse_receipt(fields)
        except (RecordError, TypeError) as exc:
            return broken(index, getattr(stored, "seq", None), Problem.MALFORMED, str(exc))
        if check_signatures:
            try:
                verify_fields(fields, public_key_of(receipt.provider), "sig")
            except RecordError as exc:
                return broken(index, receipt.seq, Problem.BAD_SIGNATURE, str(exc))
        if receipt.provider != provider or (consumer and receipt.consumer != consumer):
            return broken(
                index,
                receipt.seq,
                Problem.WRONG_PAIR,
                f"receipt {receipt.id} is {receipt.provider} → {receipt.consumer}",
            )
        consumer = receipt.consumer
        if receipt.seq > expected_seq:
            return broken(
                index, receipt.seq, Problem.SEQ_GAP, f"expected seq {expected_seq}, not later"
            )
        if receipt.seq < expected_seq:
            return broken(
                index,
                receipt.seq,
                Problem.SEQ_DISORDER,
                f"expected seq {expected_seq}: a duplicate or out of order",
            )
        if receipt.prev != expected_prev:
            return broken(
                index,
                receipt.seq,
                Problem.PREV_MISMATCH,
                "prev is not the hash of the receipt before it",
            )
        if consumer_key is not None and check_signatures and receipt.csig:
            try:
                verify_fields(fields, consumer_key, "csig")
            except RecordError as exc:
                return broken(index, receipt.seq, Problem.BAD_COUNTERSIGNATURE, str(exc))
        if require_csig and not receipt.csig:
            return broken(index, receipt.seq, Problem.MISSING_COUNTERSIGNATURE, "not countersigned")
        expected_seq, expected_prev = receipt.seq + 1, receipt_hash(receipt)

    end = (expected_seq - 1, expected_prev)
    if expect_head is not None and tuple(expect_head) != end:
        n = len(receipts)
        if expect_head[0] > end[0]:
            detail = f"chain ends at seq {end[0]}, before seq {expect_head[0]}"
            return broken(n, None, Problem.TRUNCATED, detail)
        detail = f"chain ends at seq {end[0]}, not at the expected head (seq {expect_head[0]})"
        return broken(n, None, Problem.HEAD_MISMATCH, detail)
    return ChainReport(ok=True, checked=len(receipts), head=end)
