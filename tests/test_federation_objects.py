"""The federation's signed objects: node descriptors, invite tokens and join proofs, sealed
keys, model adverts and the advert book. Round trips, and property tests that any change to
signed data, any stale or future-dated object and any unknown version is refused."""

from __future__ import annotations

import base64
import copy
import hashlib
import re
from typing import Any

import msgspec
import nacl.signing
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from federation.adverts import AdvertBook, AdvertModel, make_advert, verify_advert
from federation.descriptors import (
    fingerprint,
    make_descriptor,
    public_key_of,
    verify_descriptor,
)
from federation.identity import NodeIdentity
from federation.invites import (
    TOKEN_PREFIX,
    InviteRecord,
    JoinError,
    JoinRequest,
    create_invite,
    join_proof_message,
    make_join_request,
    parse_invite,
    verify_join_request,
)
from federation.sealing import SealError, seal_for, unseal
from ledger.canonical import b64url, b64url_decode, canonical
from ledger.records import MAX_SKEW, RecordError, sign_fields

SETTINGS = settings(max_examples=150, deadline=None, database=None)
NOW = 1_800_000_000


def identity(n: int) -> NodeIdentity:
    # Fixed keys, so that a failing hypothesis example replays with the same bytes.
    return NodeIdentity(nacl.signing.SigningKey(bytes([n]) * 32))


ALICE, BOB, CAROL = identity(1), identity(2), identity(3)
URLS = ["https://alice.example:8787", "http://10.0.0.2:8787"]
MODELS = [
    AdvertModel(
        id="llama-3-8b", kind="chat", context=8192, price_in=150_000, price_out=600_000, stream=True
    ),
    AdvertModel(id="embed-small", kind="embeddings", price_in=20_000, price_out=0, stream=False),
]

DESCRIPTOR = make_descriptor(ALICE, "alice", URLS, ttl=3600, now=NOW)
BOB_DESCRIPTOR = make_descriptor(BOB, "bob", ["https://bob.example"], ttl=3600, now=NOW)
CAROL_DESCRIPTOR = make_descriptor(CAROL, "carol", ["https://carol.example"], ttl=3600, now=NOW)
TOKEN, RECORD = create_invite(
    ALICE, URLS, ["llama-3-8b"], 5_000_000, "monthly", uses=1, ttl_seconds=3600, now=NOW
)
INVITE = parse_invite(TOKEN, now=NOW)
JOIN = make_join_request(INVITE, BOB, BOB_DESCRIPTOR, now=NOW)
ADVERT = make_advert(ALICE, 7, MODELS, ttl=600, now=NOW)


def fields_of(obj: Any) -> dict[str, Any]:
    return msgspec.json.decode(canonical(obj))


def token_fields(token: str) -> dict[str, Any]:
    return msgspec.json.decode(b64url_decode(token[len(TOKEN_PREFIX) :]))


def token_of(fields: dict[str, Any]) -> str:
    return TOKEN_PREFIX + b64url(canonical(fields))


# --- mutations of decoded JSON --------------------------------------------------------------

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every position in a JSON value, the root included."""
    found = [prefix]
    if isinstance(value, dict):
        for key, inner in value.items():
            found += paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            found += paths(inner, (*prefix, index))
    return found


def near(old: Any) -> st.SearchStrategy:
    """Replacements close to the old value, which a sloppy check is most likely to let by."""
    if isinstance(old, bool):
        return st.sampled_from([not old, int(old), None])
    if isinstance(old, int):
        return st.integers(-3, 3).map(lambda d: old + d) | st.sampled_from(
            [float(old), str(old), -old, True]
        )
    if isinstance(old, str):
        flips = st.integers(0, max(len(old) - 1, 0)).flatmap(
            lambda i: st.characters().map(lambda c: old[:i] + c + old[i + 1 :])
        )
        return flips | st.sampled_from([old + "x", old[:-1], old.upper(), "", [old]])
    if isinstance(old, list):
        return st.sampled_from([old[:-1], [*old, *old[-1:]], old[::-1], [*old, "x"]])
    return st.sampled_from([None])


@st.composite
def mutated(draw: st.DrawFn, original: Any, *, add_keys_below: tuple = ()) -> Any:
    """`original` changed in one place: a value replaced, a key or item removed, or a key
    added (only inside `add_keys_below`, the parts a signature covers)."""
    value = copy.deepcopy(original)
    path = draw(st.sampled_from([p for p in paths(value) if p]))
    *parents, last = path
    container = value
    for step in parents:
        container = container[step]
    old = container[last]
    action = draw(st.sampled_from(["near", "any", "delete", "add"]))
    if action == "delete":
        del container[last]
    elif action == "add":
        assume(isinstance(old, dict) or tuple(parents) == add_keys_below)
        target = old if isinstance(old, dict) else container
        key = draw(st.text(max_size=6).filter(lambda k: k not in target))
        target[key] = draw(json_values)
    else:
        new = draw(near(old) if action == "near" else json_values)
        container[last] = new
    assume(canonical(value) != canonical(original))
    return value


# --- node ids, fingerprints, descriptors ----------------------------------------------------


def test_public_key_of_inverts_the_node_id():
    assert public_key_of(ALICE.node_id) == bytes(ALICE.verify_key)
    assert ALICE.node_id == "ed25519:" + b64url(bytes(ALICE.verify_key))


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "ed25519:",
        ALICE.node_id.replace("ed25519:", "ED25519:"),
        ALICE.node_id.replace("ed25519:", "x25519:"),
        ALICE.node_id + "=",
        ALICE.node_id[:-1],
        ALICE.node_id + "A",
        "ed25519:" + b64url(bytes(31)),
        "ed25519:" + b64url(bytes(33)),
        ALICE.node_id[:-1] + "+",
        None,
        42,
    ],
)
def test_malformed_node_ids_raise_value_error(bad):
    with pytest.raises(ValueError):
        public_key_of(bad)


@SETTINGS
@given(st.text(max_size=60) | st.text(alphabet="ABab019_-", max_size=43).map("ed25519:".__add__))
def test_public_key_of_accepts_only_the_one_spelling_of_a_key(text):
    try:
        key = public_key_of(text)
    except ValueError:
        return
    assert len(key) == 32
    assert "ed25519:" + b64url(key) == text


def test_fingerprint_is_short_stable_dns_safe_and_documented():
    digest = hashlib.sha256(bytes(ALICE.verify_key)).digest()
    expected = base64.b32encode(digest).decode().lower()[:16]
    assert fingerprint(ALICE.node_id) == expected
    assert re.fullmatch(r"[a-z2-7]{16}", expected)
    assert fingerprint(BOB.node_id) != expected
    with pytest.raises(ValueError):
        fingerprint("ed25519:nope")


def test_descriptor_round_trip_in_any_json_key_order():
    assert DESCRIPTOR.node_id == ALICE.node_id
    assert (DESCRIPTOR.iat, DESCRIPTOR.exp) == (NOW, NOW + 3600)
    for wire in (canonical(DESCRIPTOR), msgspec.json.encode(DESCRIPTOR), fields_of(DESCRIPTOR)):
        assert verify_descriptor(wire, now=NOW) == DESCRIPTOR
        assert verify_descriptor(wire, pinned=ALICE.node_id, now=NOW) == DESCRIPTOR


def test_descriptor_default_ttl_is_seven_days():
    descriptor = make_descriptor(ALICE, "alice", URLS, now=NOW)
    assert descriptor.exp - descriptor.iat == 7 * 24 * 3600


def test_descriptor_of_another_node_fails_the_pin():
    with pytest.raises(RecordError, match="pinned"):
        verify_descriptor(canonical(BOB_DESCRIPTOR), pinned=ALICE.node_id, now=NOW)


def test_descriptor_signed_by_another_key_than_its_node_id_is_refused():
    fields = {k: v for k, v in fields_of(DESCRIPTOR).items() if k != "sig"}
    forged = sign_fields(fields, BOB.sign)  # claims to be Alice, signed by Bob
    with pytest.raises(RecordError, match="signature"):
        verify_descriptor(forged, now=NOW)


@pytest.mark.parametrize(
    ("name", "urls", "ttl"),
    [("alice", ["file:///etc/passwd"], 60), ("", URLS, 60), ("alice", URLS, 0)],
)
def test_descriptors_a_receiver_would_refuse_are_not_made(name, urls, ttl):
    with pytest.raises(ValueError):
        make_descriptor(ALICE, name, urls, ttl=ttl, now=NOW)


@SETTINGS
@given(st.data())
def test_any_change_to_a_descriptor_is_refused(data):
    original = fields_of(DESCRIPTOR)
    changed = data.draw(mutated(original, add_keys_below=()))
    with pytest.raises(RecordError):
        verify_descriptor(changed, now=NOW)
    with pytest.raises(RecordError):
        verify_descriptor(canonical(changed), now=NOW)


@SETTINGS
@given(st.integers(-(10**6), 10**6))
def test_descriptor_freshness_window_is_exact(offset):
    now = NOW + offset
    fresh = NOW - MAX_SKEW <= now <= DESCRIPTOR.exp + MAX_SKEW
    if fresh:
        assert verify_descriptor(canonical(DESCRIPTOR), now=now) == DESCRIPTOR
    else:
        with pytest.raises(RecordError, match=r"expired|future"):
            verify_descriptor(canonical(DESCRIPTOR), now=now)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_descriptor_of_another_version_is_refused_even_when_validly_signed(version):
    fields = {k: v for k, v in fields_of(DESCRIPTOR).items() if k != "sig"}
    fields["v"] = version
    with pytest.raises(RecordError, match="version"):
        verify_descriptor(sign_fields(fields, ALICE.sign), now=NOW)


# --- invites --------------------------------------------------------------------------------


def test_invite_round_trip():
    assert TOKEN.startswith("aihub1.")
    assert INVITE.issuer == ALICE.node_id
    assert INVITE.urls == URLS
    assert INVITE.models == ["llama-3-8b"]
    assert (INVITE.uses, INVITE.cap_micros, INVITE.cap_period) == (1, 5_000_000, "monthly")
    assert INVITE.exp == NOW + 3600
    assert INVITE.token_id == RECORD.token_id
    seed = b64url_decode(INVITE.seed)
    assert len(seed) == 32
    assert bytes(nacl.signing.SigningKey(seed).verify_key) == RECORD.invite_public_key
    # The token is exactly the canonical JSON of the signed fields.
    assert b64url_decode(TOKEN[len(TOKEN_PREFIX) :]) == canonical(INVITE)


def test_invite_record_keeps_the_public_key_never_the_seed():
    names = {f.name for f in msgspec.structs.fields(InviteRecord)}
    assert "seed" not in names
    stored = msgspec.json.encode(RECORD) + msgspec.msgpack.encode(RECORD)
    seed = b64url_decode(INVITE.seed)
    for form in (seed, INVITE.seed.encode(), base64.b64encode(seed), seed.hex().encode()):
        assert form not in stored


def test_every_invite_has_its_own_seed_and_token_id():
    tokens = [
        parse_invite(create_invite(ALICE, URLS, [], None, "total", 1, 60, now=NOW)[0], now=NOW)
        for _ in range(20)
    ]
    assert len({t.seed for t in tokens}) == 20
    assert len({t.token_id for t in tokens}) == 20
    assert all(t.cap_micros is None for t in tokens)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"uses": 0},
        {"ttl_seconds": 0},
        {"cap_micros": -1},
        {"cap_period": "hourly"},
        {"urls": []},
        {"urls": ["ftp://x"]},
    ],
)
def test_invites_that_would_not_parse_are_not_issued(kwargs):
    args = {
        "urls": URLS,
        "models": [],
        "cap_micros": 1,
        "cap_period": "daily",
        "uses": 1,
        "ttl_seconds": 60,
        **kwargs,
    }
    with pytest.raises(ValueError):
        create_invite(ALICE, now=NOW, **args)


@SETTINGS
@given(st.data())
def test_any_change_to_an_invite_token_field_is_refused(data):
    changed = data.draw(mutated(token_fields(TOKEN), add_keys_below=()))
    with pytest.raises(RecordError):
        parse_invite(token_of(changed), now=NOW)


@SETTINGS
@given(st.data(), st.sampled_from(["replace", "insert", "delete"]))
def test_any_character_change_to_an_invite_token_is_refused(data, action):
    index = data.draw(st.integers(0, len(TOKEN) - 1))
    if action == "delete":
        token = TOKEN[:index] + TOKEN[index + 1 :]
    else:
        char = data.draw(st.characters() | st.sampled_from("AQgw_-=.+/ \n"))
        skip = 1 if action == "replace" else 0
        token = TOKEN[:index] + char + TOKEN[index + skip :]
    assume(token != TOKEN)
    with pytest.raises(RecordError):
        parse_invite(token, now=NOW)


def test_a_non_canonical_spelling_of_a_valid_token_is_refused():
    fields = token_fields(TOKEN)
    spaced = msgspec.json.format(canonical(fields), indent=1)
    assert msgspec.json.decode(spaced) == fields
    with pytest.raises(RecordError, match="canonical"):
        parse_invite(TOKEN_PREFIX + b64url(spaced), now=NOW)


def test_an_invite_signed_by_another_node_than_its_issuer_is_refused():
    fields = {k: v for k, v in token_fields(TOKEN).items() if k != "sig"}
    with pytest.raises(RecordError, match="signature"):
        parse_invite(token_of(sign_fields(fields, BOB.sign)), now=NOW)


@pytest.mark.parametrize("version", [0, 2, None])
def test_invite_of_another_version_is_refused_even_when_validly_signed(version):
    fields = {k: v for k, v in token_fields(TOKEN).items() if k != "sig"}
    fields["v"] = version
    with pytest.raises(RecordError, match="version"):
        parse_invite(token_of(sign_fields(fields, ALICE.sign)), now=NOW)


@pytest.mark.parametrize("seed", [b64url(bytes(31)), b64url(bytes(33)), "not base64!"])
def test_invite_with_a_malformed_seed_is_refused_even_when_validly_signed(seed):
    fields = {k: v for k, v in token_fields(TOKEN).items() if k != "sig"}
    fields["seed"] = seed
    with pytest.raises(RecordError, match="seed"):
        parse_invite(token_of(sign_fields(fields, ALICE.sign)), now=NOW)


def test_expired_invite_is_refused_by_the_joiner_after_the_skew_allowance():
    assert parse_invite(TOKEN, now=INVITE.exp + MAX_SKEW) == INVITE
    with pytest.raises(RecordError, match="expired"):
        parse_invite(TOKEN, now=INVITE.exp + MAX_SKEW + 1)


@pytest.mark.parametrize("junk", ["", "aihub2." + TOKEN[7:], TOKEN[7:], "aihub1.", 7, None])
def test_things_that_are_not_tokens_are_refused(junk):
    with pytest.raises(RecordError):
        parse_invite(junk, now=NOW)


# --- join requests --------------------------------------------------------------------------


def test_join_round_trip_from_struct_bytes_and_fields():
    assert JOIN.token_id == RECORD.token_id
    assert JOIN.descriptor == BOB_DESCRIPTOR
    for wire in (JOIN, canonical(JOIN), msgspec.json.encode(JOIN), fields_of(JOIN)):
        assert verify_join_request(wire, RECORD, ALICE.node_id, now=NOW) == BOB_DESCRIPTOR


def test_join_proof_is_the_invite_keys_signature_over_the_documented_array():
    message = join_proof_message(ALICE.node_id, BOB.node_id, JOIN.nonce, JOIN.iat)
    assert message == (
        b'["aihub-join/1","'
        + ALICE.node_id.encode()
        + b'","'
        + BOB.node_id.encode()
        + b'","'
        + JOIN.nonce.encode()
        + b'",'
        + str(NOW).encode()
        + b"]"
    )
    nacl.signing.VerifyKey(RECORD.invite_public_key).verify(message, b64url_decode(JOIN.proof))


def test_the_seed_never_appears_in_the_join_request():
    seed = b64url_decode(INVITE.seed)
    wire = canonical(JOIN) + msgspec.json.encode(JOIN) + msgspec.msgpack.encode(JOIN)
    for form in (seed, INVITE.seed.encode(), base64.b64encode(seed), seed.hex().encode()):
        assert form not in wire


def test_every_join_request_has_a_fresh_nonce():
    nonces = {make_join_request(INVITE, BOB, BOB_DESCRIPTOR, now=NOW).nonce for _ in range(20)}
    assert len(nonces) == 20


def test_a_proof_made_for_one_joiner_cannot_be_used_by_another():
    stolen = msgspec.structs.replace(JOIN, descriptor=CAROL_DESCRIPTOR)
    with pytest.raises(JoinError, match="proof"):
        verify_join_request(stolen, RECORD, ALICE.node_id, now=NOW)


def test_a_proof_made_for_one_issuer_cannot_be_used_with_another():
    with pytest.raises(JoinError, match="proof"):
        verify_join_request(JOIN, RECORD, CAROL.node_id, now=NOW)


def test_a_proof_by_another_invite_seed_is_refused():
    wrong_seed = msgspec.structs.replace(INVITE, seed=b64url(bytes(range(32))))
    request = make_join_request(wrong_seed, BOB, BOB_DESCRIPTOR, now=NOW)
    with pytest.raises(JoinError, match="proof"):
        verify_join_request(request, RECORD, ALICE.node_id, now=NOW)


def test_a_proof_for_another_invite_of_the_same_issuer_is_refused():
    token, record = create_invite(ALICE, URLS, [], None, "total", 1, 60, now=NOW)
    other = make_join_request(parse_invite(token, now=NOW), BOB, BOB_DESCRIPTOR, now=NOW)
    with pytest.raises(JoinError, match="another invite"):
        verify_join_request(other, RECORD, ALICE.node_id, now=NOW)
    # ... and its token id swapped for ours does not help: the proof is by the other key.
    swapped = msgspec.structs.replace(other, token_id=RECORD.token_id)
    with pytest.raises(JoinError, match="proof"):
        verify_join_request(swapped, RECORD, ALICE.node_id, now=NOW)
    assert verify_join_request(other, record, ALICE.node_id, now=NOW) == BOB_DESCRIPTOR


def test_the_issuer_cannot_join_itself():
    request = make_join_request(INVITE, ALICE, DESCRIPTOR, now=NOW)
    with pytest.raises(JoinError, match="itself"):
        verify_join_request(request, RECORD, ALICE.node_id, now=NOW)


def test_a_join_request_needs_the_joiners_own_signed_descriptor():
    with pytest.raises(ValueError):
        make_join_request(INVITE, BOB, CAROL_DESCRIPTOR, now=NOW)
    unsigned = msgspec.structs.replace(BOB_DESCRIPTOR, sig="")
    with pytest.raises(ValueError):
        make_join_request(INVITE, BOB, unsigned, now=NOW)


@SETTINGS
@given(st.data())
def test_any_change_to_a_join_request_is_refused(data):
    # New keys may go into the (signed) descriptor; the request's own top level is not
    # signed as a whole, and fields it does not know are ignored there.
    changed = data.draw(mutated(fields_of(JOIN), add_keys_below=("descriptor",)))
    with pytest.raises(JoinError):
        verify_join_request(changed, RECORD, ALICE.node_id, now=NOW)
    with pytest.raises(JoinError):
        verify_join_request(canonical(changed), RECORD, ALICE.node_id, now=NOW)


@SETTINGS
@given(st.integers(-(10**5), 10**5))
def test_join_request_iat_must_be_within_five_minutes_either_way(offset):
    now = NOW + offset
    assume(now < RECORD.exp)
    if abs(offset) <= MAX_SKEW:
        assert verify_join_request(JOIN, RECORD, ALICE.node_id, now=now) == BOB_DESCRIPTOR
    else:
        with pytest.raises(JoinError, match="skew"):
            verify_join_request(JOIN, RECORD, ALICE.node_id, now=now)


def test_join_with_an_expired_invite_is_refused_on_the_issuers_clock():
    late = RECORD.exp - 1
    request = make_join_request(INVITE, BOB, BOB_DESCRIPTOR, now=late)
    assert verify_join_request(request, RECORD, ALICE.node_id, now=late) == BOB_DESCRIPTOR
    request = make_join_request(INVITE, BOB, BOB_DESCRIPTOR, now=RECORD.exp)
    with pytest.raises(JoinError, match="invite expired"):
        verify_join_request(request, RECORD, ALICE.node_id, now=RECORD.exp)


def test_join_with_an_expired_descriptor_is_refused():
    old = make_descriptor(BOB, "bob", ["https://bob.example"], ttl=60, now=NOW - 1000)
    request = make_join_request(INVITE, BOB, old, now=NOW)
    with pytest.raises(JoinError, match="descriptor: expired"):
        verify_join_request(request, RECORD, ALICE.node_id, now=NOW)


@pytest.mark.parametrize("version", [0, 2, None, "1"])
def test_join_request_of_another_version_is_refused(version):
    fields = fields_of(JOIN)
    fields["v"] = version
    with pytest.raises(JoinError, match="version"):
        verify_join_request(fields, RECORD, ALICE.node_id, now=NOW)


@pytest.mark.parametrize("junk", [b"not json", b"[1]", "{}", b'{"v":1}'])
def test_every_refused_join_is_a_join_error_and_a_record_error(junk):
    # One handler for every refused signed object, the join's own errors included.
    assert issubclass(JoinError, RecordError)
    with pytest.raises(JoinError):
        verify_join_request(junk, RECORD, ALICE.node_id, now=NOW)


def test_the_join_request_wire_fields():
    assert JoinRequest.__struct_fields__ == ("v", "token_id", "descriptor", "nonce", "iat", "proof")


# --- sealing --------------------------------------------------------------------------------


@SETTINGS
@given(st.binary(max_size=256))
def test_sealed_values_open_only_for_their_node(plaintext):
    sealed = seal_for(BOB.node_id, plaintext)
    assert unseal(BOB, sealed) == plaintext
    for other in (ALICE, CAROL):
        with pytest.raises(SealError):
            unseal(other, sealed)


@SETTINGS
@given(st.binary(min_size=1, max_size=64), st.data())
def test_an_altered_sealed_value_fails_rather_than_decrypting_to_noise(plaintext, data):
    raw = bytearray(b64url_decode(seal_for(BOB.node_id, plaintext)))
    index = data.draw(st.integers(0, len(raw) - 1))
    raw[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(SealError):
        unseal(BOB, b64url(bytes(raw)))
    with pytest.raises(SealError):
        unseal(BOB, b64url(bytes(raw[:-1])))


def test_sealing_is_randomised_and_refuses_garbage():
    assert seal_for(BOB.node_id, b"k") != seal_for(BOB.node_id, b"k")
    for junk in ("", "=", "not base64!", b64url(b"short")):
        with pytest.raises(SealError):
            unseal(BOB, junk)
    with pytest.raises(ValueError):
        seal_for("ed25519:nope", b"k")
    with pytest.raises(SealError):  # 32 zero bytes: not a usable point
        seal_for("ed25519:" + b64url(bytes(32)), b"k")


# --- adverts --------------------------------------------------------------------------------


def test_advert_round_trip():
    assert (ADVERT.seq, ADVERT.iat, ADVERT.exp) == (7, NOW, NOW + 600)
    for wire in (canonical(ADVERT), msgspec.json.encode(ADVERT), fields_of(ADVERT)):
        assert verify_advert(wire, pinned_node_id=ALICE.node_id, now=NOW) == ADVERT
    assert b'"context":null' in canonical(ADVERT)


def test_advert_from_a_node_other_than_the_pinned_one_is_refused():
    with pytest.raises(RecordError, match="pinned"):
        verify_advert(canonical(ADVERT), pinned_node_id=BOB.node_id, now=NOW)
    # Claiming to be the pinned node does not help when another key signed it.
    fields = {k: v for k, v in fields_of(ADVERT).items() if k != "sig"}
    with pytest.raises(RecordError, match="signature"):
        verify_advert(sign_fields(fields, BOB.sign), pinned_node_id=ALICE.node_id, now=NOW)


@pytest.mark.parametrize(
    "models",
    [
        [MODELS[0], MODELS[0]],
        [msgspec.structs.replace(MODELS[0], price_in=-1)],
        [msgspec.structs.replace(MODELS[0], context=0)],
    ],
)
def test_adverts_a_receiver_would_refuse_are_not_made(models):
    with pytest.raises(ValueError):
        make_advert(ALICE, 1, models, ttl=60, now=NOW)


def test_advert_with_a_float_price_is_refused_even_when_validly_signed():
    fields = {k: v for k, v in fields_of(ADVERT).items() if k != "sig"}
    fields["models"][0]["price_in"] = 0.15
    with pytest.raises(RecordError, match="float"):
        verify_advert(sign_fields(fields, ALICE.sign), pinned_node_id=ALICE.node_id, now=NOW)


@SETTINGS
@given(st.data())
def test_any_change_to_an_advert_is_refused(data):
    changed = data.draw(mutated(fields_of(ADVERT), add_keys_below=()))
    with pytest.raises(RecordError):
        verify_advert(changed, pinned_node_id=ALICE.node_id, now=NOW)


@SETTINGS
@given(st.integers(-(10**5), 10**5))
def test_advert_freshness_window_is_exact(offset):
    now = NOW + offset
    if NOW - MAX_SKEW <= now <= ADVERT.exp + MAX_SKEW:
        assert verify_advert(canonical(ADVERT), pinned_node_id=ALICE.node_id, now=now) == ADVERT
    else:
        with pytest.raises(RecordError, match=r"expired|future"):
            verify_advert(canonical(ADVERT), pinned_node_id=ALICE.node_id, now=now)


@pytest.mark.parametrize("version", [0, 2, None])
def test_advert_of_another_version_is_refused_even_when_validly_signed(version):
    fields = {k: v for k, v in fields_of(ADVERT).items() if k != "sig"}
    fields["v"] = version
    with pytest.raises(RecordError, match="version"):
        verify_advert(sign_fields(fields, ALICE.sign), pinned_node_id=ALICE.node_id, now=NOW)


# --- the advert book ------------------------------------------------------------------------

ADVERTS = {seq: make_advert(ALICE, seq, MODELS[:1], ttl=600, now=NOW) for seq in range(12)}
BOB_ADVERTS = {seq: make_advert(BOB, seq, MODELS[1:], ttl=600, now=NOW) for seq in range(12)}


@SETTINGS
@given(st.lists(st.integers(0, 11), min_size=1, max_size=20))
def test_advert_book_keeps_the_highest_seq_in_any_order(seqs):
    book = AdvertBook()
    highest = None
    for seq in seqs:
        taken = book.accept(ADVERTS[seq])
        assert taken == (highest is None or seq > highest)
        highest = seq if highest is None else max(highest, seq)
        assert book.current(ALICE.node_id, now=NOW) == ADVERTS[highest]
    assert book.highest_seq(ALICE.node_id) == max(seqs)
    assert book.current(BOB.node_id, now=NOW) is None


@SETTINGS
@given(st.permutations(list(range(12))), st.permutations(list(range(12))))
def test_advert_book_keeps_each_peer_apart_over_permutations(alice_order, bob_order):
    book = AdvertBook()
    for a, b in zip(alice_order, bob_order, strict=True):
        book.accept(ADVERTS[a])
        book.accept(BOB_ADVERTS[b])
    assert book.current(ALICE.node_id, now=NOW) == ADVERTS[11]
    assert book.current(BOB.node_id, now=NOW) == BOB_ADVERTS[11]
    assert not book.accept(ADVERTS[11])
    assert not book.accept(BOB_ADVERTS[11])


def test_an_expired_advert_is_dropped_but_its_seq_still_bars_older_ones():
    book = AdvertBook()
    assert book.accept(ADVERTS[5])
    expiry = ADVERTS[5].exp + MAX_SKEW
    assert book.current(ALICE.node_id, now=expiry) == ADVERTS[5]
    assert book.current(ALICE.node_id, now=expiry + 1) is None
    assert book.current(ALICE.node_id, now=NOW) is None  # dropped, not merely hidden
    assert not book.accept(ADVERTS[4])
    assert not book.accept(ADVERTS[5])
    assert book.accept(ADVERTS[6])
    assert book.current(ALICE.node_id, now=NOW) == ADVERTS[6]


def test_forgetting_a_peer_clears_its_adverts_and_seq():
    book = AdvertBook()
    book.accept(ADVERTS[3])
    book.accept(BOB_ADVERTS[3])
    book.forget(ALICE.node_id)
    assert book.current(ALICE.node_id, now=NOW) is None
    assert book.highest_seq(ALICE.node_id) is None
    assert book.current(BOB.node_id, now=NOW) == BOB_ADVERTS[3]
    assert book.accept(ADVERTS[1])


def test_bytes_that_are_not_utf8_are_refused_as_records():
    # msgspec raises UnicodeDecodeError (not DecodeError) for these; a handler of RecordError
    # must still see them.
    junk = b'{"v":1,"node_id\xd2":1}'
    with pytest.raises(RecordError, match="UTF-8"):
        verify_descriptor(junk, now=NOW)
    with pytest.raises(RecordError, match="UTF-8"):
        verify_advert(junk, pinned_node_id=ALICE.node_id, now=NOW)
    with pytest.raises(JoinError, match="UTF-8"):
        verify_join_request(junk, RECORD, ALICE.node_id, now=NOW)
    with pytest.raises(RecordError, match="UTF-8"):
        parse_invite(TOKEN_PREFIX + b64url(junk), now=NOW)


@pytest.mark.parametrize("name", ["csig", "sig_a", "sig_b"])
def test_a_foreign_signature_field_cannot_ride_along(name):
    # ledger.records leaves these names out of what `sig` covers; objects signed by one key
    # must refuse them, or their raw JSON could be changed without breaking the signature.
    with pytest.raises(RecordError, match=name):
        verify_descriptor({**fields_of(DESCRIPTOR), name: None}, now=NOW)
    with pytest.raises(RecordError, match=name):
        verify_advert({**fields_of(ADVERT), name: None}, pinned_node_id=ALICE.node_id, now=NOW)
    with pytest.raises(RecordError, match=name):
        parse_invite(token_of({**token_fields(TOKEN), name: None}), now=NOW)
    join = fields_of(JOIN)
    join["descriptor"][name] = None
    with pytest.raises(JoinError, match=name):
        verify_join_request(join, RECORD, ALICE.node_id, now=NOW)


def test_advert_listing_a_model_twice_is_refused_even_when_validly_signed():
    fields = {k: v for k, v in fields_of(ADVERT).items() if k != "sig"}
    fields["models"].append({**fields["models"][0], "price_in": 1})
    with pytest.raises(RecordError, match="twice"):
        verify_advert(sign_fields(fields, ALICE.sign), pinned_node_id=ALICE.node_id, now=NOW)
