"""The ledger's pure core: receipts, hash chains, reconciliation, settlement and netting.

Property tests (hypothesis) with real Ed25519 keys: any tampering with a stored chain is
detected at the first broken link; reconciling ledgers that miss random receipts restores
both to one set; equivocation is caught with its proof; settlements add up to the
micro-unit and count only with both signatures; netting clears every balance with at most
n - 1 transfers. No storage, no server.
"""

from __future__ import annotations

import hashlib
import json

import msgspec
import nacl.signing
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ledger.canonical import b64url
from ledger.chain import Problem, head, verify_chain
from ledger.netting import Transfer, transfer_plan
from ledger.receipts import (
    GENESIS,
    Receipt,
    countersign,
    make_receipt,
    node_id_of,
    public_key_of,
    receipt_fields,
    receipt_hash,
    verify_countersignature,
    verify_receipt,
)
from ledger.reconcile import BUCKETS, key_of, merge, reconcile
from ledger.records import RecordError
from ledger.settlement import (
    Statement,
    balances,
    check_statement,
    make_statement,
    parse_statement,
    sign_statement,
    verify_statement,
)

SETTINGS = settings(max_examples=100, deadline=None, database=None)


class Node:
    def __init__(self) -> None:
        self.key = nacl.signing.SigningKey.generate()
        self.public = bytes(self.key.verify_key)
        self.id = node_id_of(self.public)

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message).signature


# A and B are a settlement's `a` and `b` (A.id < B.id); C is a third node; EVE forges.
A, B = sorted((Node(), Node()), key=lambda node: node.id)
C, EVE = Node(), Node()
NOW = 1_700_000_000


def build_chain(
    provider: Node,
    consumer: Node,
    amounts: list[int],
    *,
    start_seq: int = 1,
    start_prev: str = GENESIS,
    countersigned: bool = True,
    tag: str = "",
) -> list[Receipt]:
    chain, prev = [], start_prev
    for offset, amount in enumerate(amounts):
        seq = start_seq + offset
        r = make_receipt(
            provider.sign,
            id=f"req-{provider.id[8:14]}-{consumer.id[8:14]}-{seq}{tag}",
            provider=provider.id,
            consumer=consumer.id,
            key_id="k1",
            model="echo",
            tokens_in=10 * seq,
            tokens_out=20 * seq,
            amount=amount,
            price_seq=3,
            seq=seq,
            prev=prev,
            iat=NOW + seq,
        )
        prev = receipt_hash(r)
        chain.append(countersign(r, consumer.sign) if countersigned else r)
    return chain


POOL = 10
A_TO_B = build_chain(A, B, [1000 * (i + 1) for i in range(POOL)])  # A provided, B consumed
B_TO_A = build_chain(B, A, [777 * (i + 1) + 1 for i in range(POOL)])
A_TO_B_PLAIN = [msgspec.structs.replace(r, csig="") for r in A_TO_B]  # not yet countersigned
B_TO_A_PLAIN = [msgspec.structs.replace(r, csig="") for r in B_TO_A]

INT_FIELDS = ("v", "tokens_in", "tokens_out", "amount", "price_seq", "iat", "seq")
STR_FIELDS = ("id", "provider", "consumer", "key_id", "model", "prev", "sig", "csig")


def check(chain: list[Receipt], expect_head: tuple[int, str] | None = None):
    return verify_chain(chain, A.public, B.public, require_csig=True, expect_head=expect_head)


# --- receipts -------------------------------------------------------------------------------


def test_receipt_round_trips_through_json_and_both_signatures_verify():
    r = A_TO_B[0]
    wire = msgspec.json.encode(r)
    assert verify_receipt(wire, A.public, consumer=B.id, now=NOW) == r
    assert verify_receipt(wire.decode(), A.public, now=NOW) == r
    assert verify_receipt(json.loads(wire), A.public, now=NOW) == r
    verify_countersignature(r, B.public)
    plain = A_TO_B_PLAIN[0]
    assert verify_receipt(plain, A.public, now=NOW) == plain
    with pytest.raises(RecordError, match="not countersigned"):
        verify_countersignature(plain, B.public)
    with pytest.raises(RecordError):
        verify_countersignature(r, A.public)  # not the consumer's key
    with pytest.raises(RecordError):
        verify_countersignature(countersign(plain, EVE.sign), B.public)
    with pytest.raises(ValueError):
        countersign(msgspec.structs.replace(plain, sig=""), B.sign)


def test_receipt_hash_is_sha256_of_the_canonical_receipt_with_sig_without_csig():
    r = A_TO_B[3]
    fields = receipt_fields(r)
    del fields["csig"]
    # Canonical JSON spelled independently: sorted keys, no whitespace, UTF-8.
    encoded = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert receipt_hash(r) == b64url(hashlib.sha256(encoded.encode()).digest())
    assert receipt_hash(r) == receipt_hash(A_TO_B_PLAIN[3])  # csig does not change it
    assert A_TO_B[4].prev == receipt_hash(r)
    assert A_TO_B[0].prev == GENESIS == b64url(bytes(32))
    assert len(GENESIS) == 43


def _wire(**changes) -> dict:
    fields = receipt_fields(A_TO_B[0])
    fields.update(changes)
    return fields


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        (_wire(amount=1000.0), "float"),
        (_wire(tokens_in=10.5), "float"),
        (_wire(v=2), "version"),
        (_wire(v=0), "version"),
        (_wire(v=1.0), "version"),
        (_wire(v=True), "version"),
        (_wire(v="1"), "version"),
        (_wire(amount=-1), ">= 0"),
        (_wire(amount=True), "bool"),
        (_wire(seq=0), ">= 1"),
        (_wire(amount=2**64), "<="),
        (_wire(amount="1000"), "str"),
        (_wire(extra="x"), "unknown field"),
        (_wire(sig_a="x"), "unknown field"),
        (_wire(amount=1001), "bad signature"),
        (_wire(csig="AAAA"), "bad signature `csig`"),
        (_wire(consumer=A.id), "differ"),
        ({k: v for k, v in _wire().items() if k != "model"}, "model"),
    ],
)
def test_refused_receipts(fields, reason):
    with pytest.raises(RecordError, match=reason):
        verify_receipt(fields, A.public, now=NOW)
    with pytest.raises(RecordError):
        verify_receipt(msgspec.json.encode(fields), A.public, now=NOW)


def test_receipt_refused_for_the_wrong_provider_consumer_or_time():
    with pytest.raises(RecordError, match="expected provider"):
        verify_receipt(A_TO_B[0], B.public, now=NOW)
    with pytest.raises(RecordError, match="another consumer"):
        verify_receipt(A_TO_B[0], A.public, consumer=C.id, now=NOW)
    with pytest.raises(RecordError, match="future"):
        verify_receipt(A_TO_B[0], A.public, now=NOW - 3600)
    for bad in (b"[1]", b"{", b"\xff", "null"):
        with pytest.raises(RecordError):
            verify_receipt(bad, A.public)


@pytest.mark.parametrize(
    "change",
    [{"amount": 1.5}, {"amount": -5}, {"seq": 0}, {"provider": "bob"}, {"consumer": A.id}],
)
def test_make_receipt_never_signs_what_a_receiver_would_refuse(change):
    args = dict(
        id="r1",
        provider=A.id,
        consumer=B.id,
        key_id="k",
        model="m",
        tokens_in=1,
        tokens_out=1,
        amount=5,
        price_seq=0,
        seq=1,
        prev=GENESIS,
    )
    with pytest.raises(ValueError):
        make_receipt(A.sign, **{**args, **change})


@SETTINGS
@given(st.sampled_from(INT_FIELDS), st.floats(allow_nan=False, allow_infinity=False))
def test_floats_are_refused_in_any_integer_field(field, value):
    with pytest.raises(RecordError):
        verify_receipt(_wire(**{field: value}), A.public, now=NOW)


# --- chains ---------------------------------------------------------------------------------


def test_intact_chains_verify_and_report_their_head():
    for n in range(POOL + 1):
        report = check(A_TO_B[:n], expect_head=head(A_TO_B[:n]))
        assert report.ok and bool(report) and report.checked == n
        assert report.head == head(A_TO_B[:n])
    assert head([]) == (0, GENESIS)
    assert head(A_TO_B) == (POOL, receipt_hash(A_TO_B[-1]))
    assert verify_chain(B_TO_A, B.public, A.public, require_csig=True)
    assert verify_chain(A_TO_B_PLAIN, A.public, B.public)  # countersignatures still to come
    report = check(A_TO_B_PLAIN)
    assert (report.index, report.problem) == (0, Problem.MISSING_COUNTERSIGNATURE)


def tampered_value(old):
    if isinstance(old, int):
        ints = st.integers(-(2**70), 2**70)
        others = st.floats(allow_nan=False) | st.booleans() | st.text(max_size=3) | st.none()
        return (ints | others).filter(lambda x: type(x) is not int or x != old)
    return (st.text(max_size=50) | st.sampled_from([A.id, B.id, C.id, GENESIS]) | st.none()).filter(
        lambda x: x != old
    )


@SETTINGS
@given(st.data())
def test_changing_any_field_of_any_receipt_is_detected_at_that_receipt(data):
    n = data.draw(st.integers(1, POOL), label="n")
    k = data.draw(st.integers(0, n - 1), label="k")
    field = data.draw(st.sampled_from(INT_FIELDS + STR_FIELDS), label="field")
    value = data.draw(tampered_value(getattr(A_TO_B[k], field)), label="value")
    chain = list(A_TO_B[:n])
    chain[k] = msgspec.structs.replace(chain[k], **{field: value})
    report = check(chain, expect_head=head(A_TO_B[:n]))
    assert not report.ok
    assert report.index == k, report
    assert report.checked == k
    assert report.head == head(A_TO_B[:k])
    assert report.expected_seq == k + 1


@SETTINGS
@given(st.integers(2, POOL), st.data())
def test_swapping_two_receipts_is_detected_at_the_first(n, data):
    i = data.draw(st.integers(0, n - 2))
    j = data.draw(st.integers(i + 1, n - 1))
    chain = list(A_TO_B[:n])
    chain[i], chain[j] = chain[j], chain[i]
    report = check(chain)
    assert (report.ok, report.index, report.problem) == (False, i, Problem.SEQ_GAP)
    assert (report.seq, report.expected_seq) == (j + 1, i + 1)


@SETTINGS
@given(st.integers(1, POOL), st.data())
def test_deleting_a_receipt_is_detected_where_it_was(n, data):
    k = data.draw(st.integers(0, n - 1))
    chain = A_TO_B[:k] + A_TO_B[k + 1 : n]
    report = check(chain, expect_head=head(A_TO_B[:n]))
    assert not report.ok and report.index == k
    if k < n - 1:
        assert report.problem == Problem.SEQ_GAP
        assert check(chain).index == k  # even without knowing the head
    else:  # the last one: only a known head can tell
        assert report.problem == Problem.TRUNCATED
        assert check(chain).ok


@SETTINGS
@given(st.integers(1, POOL), st.data())
def test_inserting_a_duplicate_is_detected(n, data):
    k = data.draw(st.integers(0, n), label="position")
    j = data.draw(st.integers(0, n - 1), label="copy of")
    chain = [*A_TO_B[:k], A_TO_B[j], *A_TO_B[k:n]]
    report = check(chain, expect_head=head(A_TO_B[:n]))
    assert not report.ok
    assert report.index == (k if j != k else k + 1)
    assert report.problem in (Problem.SEQ_GAP, Problem.SEQ_DISORDER)


@SETTINGS
@given(
    st.integers(1, POOL),
    st.data(),
    st.sampled_from(["eve signs", "altered, not re-signed", "other pair", "provider fork"]),
    st.integers(0, 10**9),
)
def test_inserting_a_forged_receipt_is_detected(n, data, kind, amount):
    k = data.draw(st.integers(0, n), label="position")
    prev = A_TO_B[k - 1] if k else None
    link = dict(seq=k + 1, prev=receipt_hash(prev) if prev else GENESIS)
    fields = dict(id="forged", key_id="k1", model="echo", tokens_in=1, tokens_out=1)
    fields |= dict(amount=amount, price_seq=3, iat=NOW, **link)
    if kind == "eve signs":  # names A as provider, signed by someone else
        forged = make_receipt(EVE.sign, provider=A.id, consumer=B.id, **fields)
        expected = (k, Problem.BAD_SIGNATURE)
    elif kind == "altered, not re-signed":
        base = A_TO_B[k] if k < n else A_TO_B_PLAIN[0]
        forged = msgspec.structs.replace(base, amount=base.amount + 1 + amount, **link)
        expected = (k, Problem.BAD_SIGNATURE)
    elif kind == "other pair":  # an authentic receipt of A → C
        forged = make_receipt(A.sign, provider=A.id, consumer=C.id, **fields)
        expected = (k, Problem.WRONG_PAIR)
    else:  # A signs a second receipt at seq k+1: the genuine one after it is out of order
        forged = countersign(make_receipt(A.sign, provider=A.id, consumer=B.id, **fields), B.sign)
        expected = (k + 1, Problem.SEQ_DISORDER if k < n else Problem.HEAD_MISMATCH)
    forged = countersign(forged, B.sign) if not forged.csig else forged
    chain = [*A_TO_B[:k], forged, *A_TO_B[k:n]]
    report = check(chain, expect_head=head(A_TO_B[:n]))
    assert (report.ok, report.index, report.problem) == (False, *expected), report


def test_verification_can_start_after_a_settlement():
    for k in range(1, POOL):
        rest = A_TO_B[k:]
        start = dict(start_seq=k + 1, start_prev=receipt_hash(A_TO_B[k - 1]))
        assert verify_chain(rest, A.public, B.public, require_csig=True, **start).ok
        bad = verify_chain(rest, A.public, B.public, start_seq=k + 1, start_prev=GENESIS)
        assert (bad.index, bad.problem) == (0, Problem.PREV_MISMATCH)
        early = verify_chain(rest, A.public, B.public, start_seq=k, start_prev=GENESIS)
        assert (early.index, early.problem) == (0, Problem.SEQ_GAP)
    report = verify_chain(A_TO_B, B.public, A.public)  # the wrong direction
    assert (report.index, report.problem) == (0, Problem.WRONG_PAIR)
    report = verify_chain(A_TO_B, A.public, C.public)
    assert (report.index, report.problem) == (0, Problem.WRONG_PAIR)


# --- reconciliation -------------------------------------------------------------------------

# Where one receipt is held: by both (either copy may still lack the countersignature), or by
# one side only (with or without it).
PLACES = ["both", "both, ours plain", "both, theirs plain", "both plain", "ours", "theirs"]
PLACES += ["ours plain", "theirs plain"]


@SETTINGS
@given(
    st.lists(st.sampled_from(PLACES), max_size=POOL),
    st.lists(st.sampled_from(PLACES), max_size=POOL),
)
def test_reconciling_ledgers_with_random_missing_receipts_restores_one_set(ab, ba):
    ours, theirs, places = [], [], {}
    for full, plain, chosen in ((A_TO_B, A_TO_B_PLAIN, ab), (B_TO_A, B_TO_A_PLAIN, ba)):
        for r, p, place in zip(full, plain, chosen, strict=False):
            places[key_of(r)] = place
            if place.startswith("both") or place.startswith("ours"):
                ours.append(p if place in ("both, ours plain", "both plain", "ours plain") else r)
            if place.startswith("both") or place.startswith("theirs"):
                theirs.append(
                    p if place in ("both, theirs plain", "both plain", "theirs plain") else r
                )
    result = reconcile(ours, theirs)
    merged, merged_back = merge(ours, theirs), merge(theirs, ours)
    assert merged == merged_back == result.merged
    assert [key_of(r) for r in merged] == sorted(places)
    for r in merged:  # the countersigned copy wins wherever either side has one
        assert bool(r.csig) == (
            places[key_of(r)] not in ("both plain", "ours plain", "theirs plain")
        )

    def keys(bucket):
        return sorted(key_of(r) for r in bucket)

    def where(*names):
        return sorted(k for k, place in places.items() if place in names)

    assert keys(result.missing_ours) == where("theirs", "theirs plain")
    assert keys(result.missing_theirs) == where("ours", "ours plain")
    assert keys(result.disputed) == where("both plain")
    assert keys(result.matched) == where("both", "both, ours plain", "both, theirs plain")
    assert keys(result.csig_for_ours) == where("both, ours plain")
    assert keys(result.csig_for_theirs) == where("both, theirs plain")
    assert not (result.mismatched or result.equivocation or result.rejected)
    totals = result.totals()
    assert list(totals) == list(BUCKETS)
    assert totals["missing_ours"].count == len(result.missing_ours)
    assert totals["missing_ours"].amount == sum(r.amount for r in result.missing_ours)
    assert totals["matched"].amount == sum(r.amount for r in result.matched)
    # After each side stores what it lacked, they agree, and nothing is left to exchange.
    assert reconcile(merged, merged_back).in_sync
    assert reconcile(merged, merged_back).totals()["missing_ours"].count == 0


def test_reconciled_chains_verify_once_complete():
    ours = A_TO_B_PLAIN[:4] + A_TO_B[6:] + B_TO_A[::2]
    theirs = A_TO_B[2:8] + B_TO_A[1::2]
    merged = merge(ours, theirs)
    a_to_b = [r for r in merged if r.provider == A.id]
    b_to_a = [r for r in merged if r.provider == B.id]
    assert verify_chain(a_to_b, A.public, B.public, expect_head=head(A_TO_B))
    assert verify_chain(b_to_a, B.public, A.public, require_csig=True)
    assert [r.csig != "" for r in a_to_b] == [False, False] + [True] * (POOL - 2)


def _fork(r: Receipt, signer: Node, **changes) -> Receipt:
    """A second receipt at r's seq, signed by `signer` (as provider)."""
    fields = {k: v for k, v in receipt_fields(r).items() if k not in ("v", "sig", "csig")} | changes
    return make_receipt(signer.sign, **fields)


@SETTINGS
@given(
    st.integers(0, POOL - 1),
    st.integers(0, 10**9),
    st.booleans(),
    st.sampled_from(["amount", "id", "model"]),
)
def test_equivocation_is_detected_with_both_receipts_as_proof(k, amount, swap, field):
    genuine = A_TO_B[k]
    change = {"amount": amount} if field == "amount" else {field: f"{field}-other"}
    assume(getattr(genuine, field) != change[field])
    fork = _fork(genuine, A, **change)  # A signs two receipts at one seq
    ours, theirs = list(A_TO_B), [*A_TO_B[:k], fork, *A_TO_B[k + 1 :]]
    if swap:
        ours, theirs = theirs, ours
    result = reconcile(ours, theirs)
    assert len(result.equivocation) == 1
    proof = result.equivocation[0]
    assert (proof.provider, proof.consumer, proof.seq) == (A.id, B.id, k + 1)
    assert proof.first == ours[k] and proof.second == theirs[k]
    for r in (proof.first, proof.second):  # both stand as proof on their own
        verify_receipt(msgspec.json.encode(r), A.public, now=NOW + 100)
    assert proof.first != proof.second
    assert len(result.matched) == POOL - 1
    assert not (result.mismatched or result.missing_ours or result.missing_theirs)
    assert result.merged[k] == ours[k]  # our copy stays; the ledger is append-only
    assert result.totals()["equivocation"].count == 1
    assert not result.in_sync


def test_a_copy_not_signed_by_the_provider_is_a_mismatch_not_equivocation():
    altered = msgspec.structs.replace(A_TO_B[2], amount=A_TO_B[2].amount * 10)
    result = reconcile(A_TO_B, [*A_TO_B[:2], altered, *A_TO_B[3:]])
    assert not result.equivocation and len(result.mismatched) == 1
    mismatch = result.mismatched[0]
    assert (mismatch.ours, mismatch.theirs) == (A_TO_B[2], altered)
    assert (mismatch.ours_valid, mismatch.theirs_valid) == (True, False)
    assert result.totals()["mismatched"] == (1, A_TO_B[2].amount)
    assert merge(A_TO_B, [altered]) == A_TO_B
    # Signed by someone else than the provider: also no proof of anything.
    eve = _fork(A_TO_B[2], EVE, amount=1)
    result = reconcile(A_TO_B, [eve])
    assert len(result.mismatched) == 1 and not result.equivocation


def test_peer_copies_that_fail_verification_are_rejected_not_merged():
    forged = _fork(A_TO_B[0], EVE)  # names A as provider, signed by EVE
    bad_csig = countersign(A_TO_B_PLAIN[1], EVE.sign)
    other = build_chain(A, C, [5])[0]
    result = reconcile([], [forged, bad_csig, other], between=(A.id, B.id))
    assert len(result.rejected) == 3
    assert not result.merged and not result.missing_ours
    assert result.totals()["rejected"].count == 3
    # A bad countersignature of theirs is not taken over our plain copy.
    result = reconcile([A_TO_B_PLAIN[1]], [bad_csig])
    assert result.disputed == [A_TO_B_PLAIN[1]] and not result.csig_for_ours


# --- settlement -----------------------------------------------------------------------------

amounts_st = st.lists(st.integers(0, 10**12), max_size=6)


@SETTINGS
@given(amounts_st, amounts_st)
def test_statement_amounts_are_the_sums_of_the_chains_and_need_both_signatures(ab, ba):
    a_to_b, b_to_a = build_chain(A, B, ab), build_chain(B, A, ba)
    s = make_statement(a_to_b, b_to_a, A.id, B.id, previous=None, now=NOW)
    assert (s.a_owes_b, s.b_owes_a) == (sum(ba), sum(ab))
    assert s.net == sum(ba) - sum(ab)
    assert (s.from_seq, s.to_seq) == (1, len(ab))
    assert (s.head_a_to_b, s.head_b_to_a) == (head(a_to_b)[1], head(b_to_a)[1])
    signed_a, signed_b = sign_statement(s, A.sign, "a"), sign_statement(s, B.sign, "b")
    both = sign_statement(signed_a, B.sign, "b")
    assert both == sign_statement(signed_b, A.sign, "a")
    verify_statement(both, A.public, B.public, now=NOW)
    verify_statement(msgspec.json.encode(both), A.public, B.public, now=NOW)
    for half in (s, signed_a, signed_b):
        with pytest.raises(RecordError, match="both"):
            verify_statement(half, A.public, B.public, now=NOW)
    with pytest.raises(RecordError):
        verify_statement(both, B.public, A.public, now=NOW)
    forged = msgspec.structs.replace(both, sig_b=signed_a.sig_a)
    with pytest.raises(RecordError):
        verify_statement(forged, A.public, B.public, now=NOW)
    # Changing the totals breaks both signatures, however consistently it is done.
    cheaper = msgspec.structs.replace(both, a_owes_b=both.a_owes_b + 1, net=both.net + 1)
    with pytest.raises(RecordError):
        verify_statement(cheaper, A.public, B.public, now=NOW)
    check_statement(both, a_to_b, b_to_a, previous=None)
    with pytest.raises(RecordError, match="a_owes_b"):
        check_statement(cheaper, a_to_b, b_to_a, previous=None)
    assert balances([both]) == {A.id: -s.net, B.id: s.net}


@SETTINGS
@given(amounts_st, amounts_st, amounts_st, amounts_st)
def test_consecutive_statements_continue_the_chains(ab1, ba1, ab2, ba2):
    a_to_b, b_to_a = build_chain(A, B, ab1 + ab2), build_chain(B, A, ba1 + ba2)
    first = make_statement(a_to_b[: len(ab1)], b_to_a[: len(ba1)], A.id, B.id, previous=None)
    second = make_statement(a_to_b[len(ab1) :], b_to_a[len(ba1) :], A.id, B.id, previous=first)
    assert (second.from_seq, second.to_seq) == (len(ab1) + 1, len(ab1) + len(ab2))
    assert (second.head_a_to_b, second.head_b_to_a) == (head(a_to_b)[1], head(b_to_a)[1])
    assert first.a_owes_b + second.a_owes_b == sum(ba1 + ba2)
    assert first.b_owes_a + second.b_owes_a == sum(ab1 + ab2)
    assert sum(balances([first, second]).values()) == 0
    assert balances([first, second])[B.id] == sum(ba1 + ba2) - sum(ab1 + ab2)
    # Later verification starts from the first statement's checkpoint.
    assert verify_chain(
        a_to_b[len(ab1) :],
        A.public,
        B.public,
        start_seq=first.to_seq + 1,
        start_prev=first.head_a_to_b,
    )
    assert verify_chain(
        b_to_a[len(ba1) :],
        B.public,
        A.public,
        start_seq=len(ba1) + 1,
        start_prev=first.head_b_to_a,
    )
    if len(ab2) > 1:  # a gap at the start of the period is refused
        with pytest.raises(ValueError, match="continuation"):
            make_statement(a_to_b[len(ab1) + 1 :], [], A.id, B.id, previous=first)
    if len(ba2) > 1:
        with pytest.raises(ValueError, match="continuation"):
            make_statement([], b_to_a[len(ba1) + 1 :], A.id, B.id, previous=first)


def test_statement_form_is_enforced():
    s = make_statement(A_TO_B[:3], B_TO_A[:2], A.id, B.id, previous=None, now=NOW)
    with pytest.raises(ValueError, match="sort before"):
        make_statement(B_TO_A, A_TO_B, B.id, A.id, previous=None)
    with pytest.raises(ValueError, match="continuation"):
        make_statement(B_TO_A[:1], [], A.id, B.id, previous=None)  # chains swapped
    with pytest.raises(ValueError, match="not node"):
        sign_statement(s, EVE.sign, "a")
    fields = msgspec.to_builtins(s)
    for change, reason in [
        ({"net": s.net + 1}, "net"),
        ({"v": 2}, "version"),
        ({"a_owes_b": float(s.a_owes_b)}, "float"),
        ({"a": B.id, "b": A.id}, "sort before"),
        ({"to_seq": -1}, ">= 0"),
        ({"extra": 1}, "unknown field"),
    ]:
        with pytest.raises(RecordError, match=reason):
            parse_statement({**fields, **change})
    assert parse_statement(msgspec.json.encode(s)) == s
    assert isinstance(parse_statement(fields), Statement)


# --- netting --------------------------------------------------------------------------------


def apply(plan: list[Transfer], start: dict[str, int]) -> dict[str, int]:
    result = dict(start)
    for t in plan:
        assert t.amount > 0 and t.payer != t.payee
        result[t.payer] += t.amount  # a debtor's negative balance rises to zero
        result[t.payee] -= t.amount
    return result


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.integers(-(10**15), 10**15), max_size=15), st.randoms(use_true_random=False))
def test_netting_clears_every_balance_with_at_most_n_minus_1_transfers(amounts, rng):
    balances_ = {f"ed25519:node{i:02d}": amount for i, amount in enumerate(amounts)}
    balances_["ed25519:last"] = -sum(amounts)
    plan = transfer_plan(balances_)
    nonzero = sum(1 for amount in balances_.values() if amount)
    assert len(plan) <= max(nonzero - 1, 0)
    assert all(amount == 0 for amount in apply(plan, balances_).values())
    items = list(balances_.items())
    rng.shuffle(items)
    assert transfer_plan(dict(items)) == plan  # the order of the mapping does not matter


def test_netting_refuses_balances_that_do_not_sum_to_zero():
    with pytest.raises(ValueError, match="sum to zero"):
        transfer_plan({"x": 5, "y": -4})
    with pytest.raises(ValueError, match="integer"):
        transfer_plan({"x": 0.5, "y": -0.5})
    assert transfer_plan({}) == [] == transfer_plan({"x": 0})


def test_three_nodes_settle_and_net_to_the_micro_unit():
    nodes = sorted((A, B, C), key=lambda node: node.id)
    statements = []
    for i, x in enumerate(nodes):
        for y in nodes[i + 1 :]:
            xy = build_chain(x, y, [123_456, 7], tag="g")
            yx = build_chain(y, x, [1_000_001 * (i + 1)], tag="g")
            s = make_statement(xy, yx, x.id, y.id, previous=None)
            s = sign_statement(sign_statement(s, x.sign, "a"), y.sign, "b")
            verify_statement(s, x.public, y.public)
            statements.append(s)
    owed = balances(statements)
    assert sum(owed.values()) == 0
    plan = transfer_plan(owed)
    assert len(plan) <= 2
    assert all(amount == 0 for amount in apply(plan, owed).values())


def test_node_ids_are_keys():
    assert public_key_of(A.id) == A.public
    for bad in ("ed25519:xyz", "rsa:" + A.id[8:], A.id + "A", 5):
        with pytest.raises(RecordError):
            public_key_of(bad)  # type: ignore[arg-type]
