"""Reconciliation: compare our receipts with a peer's copies of the same chains.

Receipts are keyed by (provider, consumer, seq); one call may hold one chain direction or
both. Two copies are *the same receipt* when their `receipt_hash` (everything but `csig`)
agrees. Every key lands in exactly one bucket:

- matched — both sides hold it, and at least one copy is countersigned;
- disputed — both sides hold it, and neither copy is countersigned;
- missing_ours — only the peer holds it (validly signed): we can store it;
- missing_theirs — only we hold it: to send to the peer;
- mismatched — two different copies, not both validly signed by the provider (one side's
  copy was altered or corrupted; `ours_valid`/`theirs_valid` say which);
- equivocation — two different copies, both validly signed by the provider: proof that the
  provider signed two receipts for one seq (both receipts are kept as the proof);
- rejected — a copy of the peer's that fails verification and matches nothing of ours.

Verification: a node id is its key, so signatures are checked here against the keys the
receipts name; no key lookup is needed. Our own receipts are trusted as stored (they were
verified on the way in, and `verify_chain` re-checks them); the peer's copies are verified
wherever they decide something: a receipt only they hold, a countersignature we would take
from them, and both copies of any conflict (an equivocation is only proof if both verify).
Which nodes the receipts may be between is the caller's to pin: pass `between=(a, b)` and
receipts of any other pair are rejected. Chain links (seq, prev) are not checked here: store
what `missing_ours` recovers, then run `verify_chain`.

`merge` is the union after reconciliation, one copy per key, countersigned copies preferred;
for a conflict our own copy stays (the ledger is append-only) and nothing of theirs is taken.
So two ledgers that differ only by missing receipts (and missing countersignatures) are the
same set after each merges the other's.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from ledger.receipts import (
    Receipt,
    parse_receipt,
    public_key_of,
    receipt_fields,
    receipt_hash,
    verify_receipt,
)
from ledger.records import RecordError, verify_fields

Key = tuple[str, str, int]

BUCKETS = (
    "matched",
    "disputed",
    "missing_ours",
    "missing_theirs",
    "mismatched",
    "equivocation",
    "rejected",
)


def key_of(r: Receipt) -> Key:
    return (r.provider, r.consumer, r.seq)


@dataclass(frozen=True)
class Mismatch:
    """Two different copies at one key, not both signed by the provider. `ours` or `theirs`
    is None where only one side holds (differing) copies."""

    ours: Receipt | None
    theirs: Receipt | None
    ours_valid: bool
    theirs_valid: bool

    @property
    def amount(self) -> int:
        copy = self.ours if self.ours is not None else self.theirs
        return copy.amount if copy is not None else 0


@dataclass(frozen=True)
class Equivocation:
    """Proof of cheating: two different receipts, both validly signed by `provider`, for
    the same (provider, consumer, seq). `first` is our copy where we hold one."""

    provider: str
    consumer: str
    seq: int
    first: Receipt
    second: Receipt

    @property
    def amount(self) -> int:
        return self.first.amount


@dataclass(frozen=True)
class Rejected:
    receipt: Receipt
    reason: str

    @property
    def amount(self) -> int:
        amount = getattr(self.receipt, "amount", 0)
        return amount if isinstance(amount, int) else 0


class Totals(NamedTuple):
    count: int
    amount: int  # micro-units; for conflicts, the amount of our copy where we hold one


@dataclass
class Reconciliation:
    matched: list[Receipt] = field(default_factory=list)
    disputed: list[Receipt] = field(default_factory=list)
    missing_ours: list[Receipt] = field(default_factory=list)
    missing_theirs: list[Receipt] = field(default_factory=list)
    mismatched: list[Mismatch] = field(default_factory=list)
    equivocation: list[Equivocation] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    # Matched receipts whose countersignature only the peer's copy has (we update ours),
    # and only ours has (we send it back to them).
    csig_for_ours: list[Receipt] = field(default_factory=list)
    csig_for_theirs: list[Receipt] = field(default_factory=list)
    # The union: one copy per key, sorted by (provider, consumer, seq).
    merged: list[Receipt] = field(default_factory=list)

    def totals(self) -> dict[str, Totals]:
        """Count and amount of each bucket, in `BUCKETS` order."""
        return {
            name: Totals(len(items), sum(item.amount for item in items))
            for name, items in ((name, getattr(self, name)) for name in BUCKETS)
        }

    @property
    def in_sync(self) -> bool:
        """Both sides hold the same receipts, with no conflict and nothing rejected."""
        return not (
            self.missing_ours
            or self.missing_theirs
            or self.mismatched
            or self.equivocation
            or self.rejected
            or self.csig_for_ours
            or self.csig_for_theirs
        )


def _signed_by_provider(r: Receipt) -> bool:
    try:
        verify_fields(receipt_fields(parse_receipt(r)), public_key_of(r.provider), "sig")
    except (RecordError, TypeError):
        return False
    return True


def _csig_valid(r: Receipt) -> bool:
    try:
        verify_fields(receipt_fields(r), public_key_of(r.consumer), "csig")
    except (RecordError, TypeError):
        return False
    return True


def _hash(r: Receipt) -> str | None:
    try:
        return receipt_hash(r)
    except (RecordError, TypeError):
        return None


def _best(copies: Sequence[Receipt]) -> Receipt:
    """Of identical copies on one side, the first countersigned one, else the first."""
    return next((r for r in copies if r.csig), copies[0])


def reconcile(
    ours: Sequence[Receipt],
    theirs: Sequence[Receipt],
    *,
    between: tuple[str, str] | None = None,
) -> Reconciliation:
    """Compare our receipts with the peer's (see the module docstring for the buckets and
    what is verified). Deterministic: the buckets follow (provider, consumer, seq) order
    (`rejected` lists receipts of other pairs first)."""
    result = Reconciliation()
    ours_by: dict[Key, list[Receipt]] = defaultdict(list)
    theirs_by: dict[Key, list[Receipt]] = defaultdict(list)
    for r in ours:
        ours_by[key_of(r)].append(r)
    for r in theirs:
        if between is not None and {r.provider, r.consumer} != set(between):
            result.rejected.append(Rejected(r, "receipt is not between the reconciled nodes"))
        else:
            theirs_by[key_of(r)].append(r)

    for key in sorted(ours_by.keys() | theirs_by.keys()):
        mine, peer = ours_by.get(key, []), theirs_by.get(key, [])
        contents: dict[str | None, list[tuple[str, Receipt]]] = defaultdict(list)
        for side, copies in (("ours", mine), ("theirs", peer)):
            for r in copies:
                contents[_hash(r)].append((side, r))

        if len(contents) > 1:
            _conflict(result, mine, peer, contents)
            continue

        if not peer:  # ours only
            result.missing_theirs.append(_best(mine))
            result.merged.append(_best(mine))
            continue
        if not mine:  # theirs only: verify before we take it
            r = _best(peer)
            try:
                verify_receipt(r, public_key_of(r.provider))
            except (RecordError, TypeError) as exc:
                result.rejected.append(Rejected(r, str(exc)))
                continue
            result.missing_ours.append(r)
            result.merged.append(r)
            continue

        copy = _best(mine)
        if copy.csig:
            if not any(r.csig for r in peer):
                result.csig_for_theirs.append(copy)
        else:
            signed = next((r for r in peer if r.csig and _csig_valid(r)), None)
            if signed is not None:
                copy = signed
                result.csig_for_ours.append(copy)
        (result.matched if copy.csig else result.disputed).append(copy)
        result.merged.append(copy)
    return result


def _conflict(
    result: Reconciliation,
    mine: Sequence[Receipt],
    peer: Sequence[Receipt],
    contents: dict[str | None, list[tuple[str, Receipt]]],
) -> None:
    """Two or more different copies at one key: equivocation if two are validly signed by
    the provider, a mismatch otherwise. Our copy stays in the merge; nothing of theirs."""
    valid: list[Receipt] = []
    validity: dict[int, bool] = {}
    # Our copies first, so that the proof's `first` is ours where we hold one.
    for content in sorted(contents, key=lambda h: (h is None, h or "")):
        copies = contents[content]
        copies.sort(key=lambda pair: pair[0] != "ours")
        ok = content is not None and _signed_by_provider(copies[0][1])
        for _, r in copies:
            validity[id(r)] = ok
        if ok:
            valid.append(copies[0][1])
    if mine:
        result.merged.append(_best(mine))
    if len(valid) >= 2:
        own = [r for r in valid if any(r is m for m in mine)]
        first = own[0] if own else valid[0]
        second = next(r for r in valid if r is not first)
        provider, consumer, seq = key_of(first)
        result.equivocation.append(Equivocation(provider, consumer, seq, first, second))
        return
    ours_copy = mine[0] if mine else None
    ours_hash = _hash(ours_copy) if ours_copy is not None else "-"
    theirs_copy = next((r for r in peer if _hash(r) != ours_hash), None)
    result.mismatched.append(
        Mismatch(
            ours=ours_copy,
            theirs=theirs_copy,
            ours_valid=ours_copy is not None and validity[id(ours_copy)],
            theirs_valid=theirs_copy is not None and validity[id(theirs_copy)],
        )
    )


def merge(
    ours: Sequence[Receipt],
    theirs: Sequence[Receipt],
    *,
    between: tuple[str, str] | None = None,
) -> list[Receipt]:
    """The union of both ledgers after reconciliation (see `reconcile`), in (provider,
    consumer, seq) order."""
    return reconcile(ours, theirs, between=between).merged
