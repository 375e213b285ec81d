"""Property tests of the pure parts: key format and hashing, canonical encoding and base64url,
request costs, config parsing and the embeddings request type. No server."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import string

import msgspec
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from adapters.types import EmbeddingRequest, Usage
from ledger.canonical import b64url, b64url_decode, canonical
from node.config import CONFIG_TEMPLATE, Config, ConfigError, parse_config, semantic_problems
from node.gateway.keys import (
    KEY_PREFIX,
    bearer_token,
    generate_key,
    hash_key,
    hashes_match,
    key_id_of,
)
from node.gateway.usage import cost_micros

SETTINGS = settings(max_examples=300, deadline=None, database=None)

KEY_RE = re.compile(r"sk-hub-([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
HEX = "0123456789abcdef"
URLSAFE = string.ascii_letters + string.digits + "-_"
ID_START, ID_END = len(KEY_PREFIX), len(KEY_PREFIX) + 12  # the id is key[7:19]
SECRET = hashlib.blake2b(b"test secret", digest_size=32).digest()

secrets_st = st.binary(min_size=1, max_size=64)
# Well-formed keys drawn by hypothesis (generate_key draws from the OS, which hypothesis
# could not replay); test_generate_key_* check that real keys have this very form.
keys_st = st.from_regex(KEY_RE, fullmatch=True).map(lambda key: (key, key[ID_START:ID_END]))


# --- node/gateway/keys.py -------------------------------------------------------------------------


def test_generated_keys_are_well_formed_unique_and_carry_their_id():
    pairs = [generate_key() for _ in range(1000)]
    for key, key_id in pairs:
        assert KEY_RE.fullmatch(key), key
        assert key_id_of(key) == key_id
        assert bearer_token(f"Bearer {key}") == key
    assert len({key for key, _ in pairs}) == 1000
    assert len({key_id for _, key_id in pairs}) == 1000


@SETTINGS
@given(keys_st, st.integers(0, 62), st.characters(), secrets_st)
@example(
    pair=("sk-hub-0123456789ab_" + "A" * 43, "0123456789ab"),
    index=0,
    char="\ud800",
    secret=b"s" * 32,
)
def test_any_substitution_changes_the_hash_and_the_id_exactly_as_the_format_says(
    pair, index, char, secret
):
    key, key_id = pair
    assume(char != key[index])
    mutated = key[:index] + char + key[index + 1 :]
    stored = hash_key(secret, key)
    assert hash_key(secret, mutated) != stored
    assert not hashes_match(stored, secret, mutated)
    assert hashes_match(stored, secret, key)
    found = key_id_of(mutated)
    if ID_START <= index < ID_END:
        expected = mutated[ID_START:ID_END] if char in HEX else None
        assert found == expected
        if found is not None:
            assert found != key_id
    elif index > ID_END:
        assert found == (key_id if char in URLSAFE else None)
    else:  # the prefix or the `_` separator
        assert found is None


@SETTINGS
@given(keys_st, st.integers(0, 63), st.characters())
@example(pair=("sk-hub-0123456789ab_" + "A" * 43, "0123456789ab"), index=63, char="\n")
def test_an_inserted_or_deleted_character_never_yields_a_key_id(pair, index, char):
    """A key of another length is not well-formed, so `key_id_of` must answer None. The
    example appends a newline, which the `$` of a regex matched with `re.match` lets through."""
    key, _ = pair
    variants = [key[:index] + char + key[index:]]
    if index < len(key):
        variants.append(key[:index] + key[index + 1 :])
    for variant in variants:
        assert key_id_of(variant) is None, repr(variant)
        assert hash_key(SECRET, variant) != hash_key(SECRET, key)


@SETTINGS
@given(st.one_of(st.none(), st.text(), st.text(alphabet=" \t\nBbEeAaRr-_sk")))
@example("Bearer")
@example("Bearer ")
@example("bearer  x ")
@example("BEARER\tx")
def test_bearer_token_never_raises_and_only_reads_the_bearer_scheme(header):
    token = bearer_token(header)
    if token is None:
        return
    assert isinstance(token, str) and token
    assert token == token.strip()
    assert header is not None
    scheme, sep, rest = header.partition(" ")
    assert scheme.lower() == "bearer" and sep == " "
    assert rest.strip() == token


@SETTINGS
@given(
    st.sampled_from(["Bearer", "bearer", "BEARER", "bEaReR"]),
    st.text(min_size=1).filter(lambda t: t.strip() == t and t != ""),
    st.sampled_from(["", " ", "   ", "\t"]),
)
def test_bearer_token_round_trips(scheme, token, trailing):
    assert bearer_token(f"{scheme} {token}{trailing}") == token


@SETTINGS
@given(st.sampled_from(["Basic", "Token", "Bearer:", "Bearerx", ""]), st.text())
def test_other_schemes_give_no_token(scheme, token):
    assert bearer_token(f"{scheme} {token}") is None


# --- ledger/canonical.py ------------------------------------------------------------------


@SETTINGS
@given(st.binary(max_size=200))
def test_b64url_round_trips_unpadded(data):
    text = b64url(data)
    assert set(text) <= set(URLSAFE)
    assert "=" not in text
    assert b64url_decode(text) == data
    assert text == base64.urlsafe_b64encode(data).decode().rstrip("=")


@SETTINGS
@given(st.binary(min_size=1, max_size=60), st.data())
def test_b64url_decode_rejects_padding_and_foreign_characters(data, draw):
    text = b64url(data)
    padded = base64.urlsafe_b64encode(data).decode()
    if padded != text:
        with pytest.raises(ValueError):
            b64url_decode(padded)
    foreign = draw.draw(st.characters().filter(lambda c: c not in URLSAFE), label="foreign")
    index = draw.draw(st.integers(0, len(text)), label="index")
    for bad in (text[:index] + foreign + text[index:], text[:index] + foreign + text[index + 1 :]):
        with pytest.raises(ValueError):
            b64url_decode(bad)


@SETTINGS
@given(st.one_of(st.text(), st.text(alphabet=URLSAFE + "=+/ \n"), st.text(alphabet=URLSAFE)))
@example("A")
@example("AB")  # non-zero trailing bits: not what b64url would write
@example("+/+/")
@example("AAAA\n")
def test_b64url_decode_accepts_exactly_the_canonical_encodings(text):
    try:
        decoded = b64url_decode(text)
    except ValueError:
        canonical_form = False
    else:
        canonical_form = True
        assert b64url(decoded) == text
    if set(text) - set(URLSAFE) or len(text) % 4 == 1:
        assert not canonical_form


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(st.text(), children, max_size=5)
    ),
    max_leaves=30,
)


def _shuffled(value, rng: random.Random):
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {key: _shuffled(item, rng) for key, item in items}
    if isinstance(value, list):
        return [_shuffled(item, rng) for item in value]
    return value


def _assert_sorted_keys(value) -> None:
    if isinstance(value, dict):
        assert list(value) == sorted(value)
        for item in value.values():
            _assert_sorted_keys(item)
    elif isinstance(value, list):
        for item in value:
            _assert_sorted_keys(item)


def _whitespace_outside_strings(encoded: bytes) -> list[int]:
    found, in_string, escaped = [], False, False
    for position, byte in enumerate(encoded):
        if in_string:
            if escaped:
                escaped = False
            elif byte == ord("\\"):
                escaped = True
            elif byte == ord('"'):
                in_string = False
        elif byte == ord('"'):
            in_string = True
        elif byte in b" \t\r\n":
            found.append(position)
    return found


@SETTINGS
@given(json_values, st.randoms(use_true_random=False))
def test_canonical_is_deterministic_sorted_and_compact(value, rng):
    encoded = canonical(value)
    assert canonical(value) == encoded
    assert canonical(_shuffled(value, rng)) == encoded
    assert _whitespace_outside_strings(encoded) == []
    decoded = json.loads(encoded.decode("utf-8"))
    _assert_sorted_keys(decoded)
    assert canonical(decoded) == encoded
    assert msgspec.json.decode(encoded) == value


# --- node/gateway/usage.py ------------------------------------------------------------------------

tokens_st = st.integers(0, 10**9)
prices_st = st.integers(0, 10**12)


@SETTINGS
@given(tokens_st, tokens_st, prices_st, prices_st)
@example(0, 0, 0, 0)
@example(1, 0, 1, 0)
@example(7, 3, 100_000, 200_000)
def test_cost_is_the_exact_integer_ceiling(tokens_in, tokens_out, price_in, price_out):
    cost = cost_micros(Usage(tokens_in, tokens_out, tokens_in + tokens_out), price_in, price_out)
    assert isinstance(cost, int) and cost >= 0
    numerator = tokens_in * price_in + tokens_out * price_out
    quotient, remainder = divmod(numerator, 1_000_000)
    assert cost == quotient + (1 if remainder else 0)
    assert cost * 1_000_000 >= numerator > (cost - 1) * 1_000_000


@SETTINGS
@given(tokens_st, tokens_st, prices_st, prices_st, st.integers(0, 4), st.integers(1, 10**9))
def test_cost_is_monotonic_in_tokens_and_prices(
    tokens_in, tokens_out, price_in, price_out, which, bump
):
    before = cost_micros(Usage(tokens_in, tokens_out), price_in, price_out)
    args = [tokens_in, tokens_out, price_in, price_out]
    if which < 4:
        args[which] += bump
    else:
        args = [a + bump for a in args]
    after = cost_micros(Usage(args[0], args[1]), args[2], args[3])
    assert after >= before


# --- node/config.py -----------------------------------------------------------------------


def _parses_or_config_error(data: bytes) -> None:
    try:
        config = parse_config(data, "fuzz.toml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.toml: ")
    else:
        assert isinstance(config, Config)
        assert semantic_problems(config) == []


@SETTINGS
@given(st.binary(max_size=300))
@example(b"\xff")
@example(b'[node]\nname = "caf\xe9"\n')  # Latin-1, not UTF-8
def test_parse_config_raises_only_config_error_on_arbitrary_bytes(data):
    _parses_or_config_error(data)


@SETTINGS
@given(st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=300))
def test_parse_config_raises_only_config_error_on_arbitrary_text(text):
    _parses_or_config_error(text.encode())


TEMPLATE = CONFIG_TEMPLATE.replace("{name}", '"fuzz"')
_ASSIGNMENT = re.compile(r"^([A-Za-z_]+) = ", re.MULTILINE)
ASSIGNMENTS = [m.start() for m in _ASSIGNMENT.finditer(TEMPLATE)]

toml_strings = st.text(max_size=20).map(lambda s: json.dumps(s))
toml_values = st.recursive(
    st.one_of(
        st.integers(-(2**70), 2**70).map(str),
        st.floats(allow_nan=False).map(repr),
        st.sampled_from(["nan", "inf", "-inf", "true", "false", "1979-05-27", "07:32:00"]),
        st.sampled_from(["1979-05-27T07:32:00Z", "0x7f", "1_000", "''", "'''x'''"]),
        toml_strings,
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.dictionaries(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), children, max_size=3).map(
            lambda d: "{" + ", ".join(f"{k} = {v}" for k, v in d.items()) + "}"
        ),
    ),
    max_leaves=8,
)


@SETTINGS
@given(st.sampled_from(ASSIGNMENTS), toml_values, st.booleans())
def test_parse_config_survives_any_value_in_any_setting(start, value, append_unknown):
    line_end = TEMPLATE.index("\n", start)
    key = _ASSIGNMENT.match(TEMPLATE, start).group(1)
    text = TEMPLATE[:start] + f"{key} = {value}" + TEMPLATE[line_end:]
    if append_unknown:
        text += f"\n[[models]]\nname = {value}\nprovider = {value}\n"
    _parses_or_config_error(text.encode())


def test_the_template_itself_parses():
    config = parse_config(TEMPLATE.encode())
    assert config.node.name == "fuzz"
    assert [d.name for d in config.models] == ["echo", "echo-embed"]


# --- adapters/types.py: EmbeddingRequest --------------------------------------------------

token_ids = st.integers(-(2**63), 2**64 - 1)
embedding_items = st.one_of(
    st.text(max_size=10),
    token_ids,
    st.lists(token_ids, max_size=4),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.one_of(st.text(max_size=3), st.booleans(), st.floats(-1, 1)), min_size=1),
    st.dictionaries(st.text(max_size=3), token_ids, max_size=2),
)


def _shape(value) -> str | None:
    """Which of OpenAI's four input shapes `value` has, or None."""
    if isinstance(value, str):
        return "text"
    if not isinstance(value, list) or not 1 <= len(value) <= 2048:
        return None

    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if all(isinstance(x, str) for x in value):
        return "texts"
    if all(is_int(x) for x in value):
        return "ids"
    if all(isinstance(x, list) and all(is_int(i) for i in x) for x in value):
        return "id lists"
    return None


def _decode_embedding(value):
    body = msgspec.json.encode({"model": "m", "input": value})
    return msgspec.json.decode(body, type=EmbeddingRequest)


@SETTINGS
@given(
    st.one_of(
        st.text(max_size=30),
        st.lists(st.text(max_size=10), min_size=1, max_size=6),
        st.lists(token_ids, min_size=1, max_size=6),
        st.lists(st.lists(token_ids, max_size=4), min_size=1, max_size=6),
    )
)
def test_embedding_request_accepts_the_four_openai_shapes(value):
    request = _decode_embedding(value)
    assert request.input == value
    texts = request.texts()
    shape = _shape(value)
    assert shape is not None
    assert len(texts) == {"text": 1, "texts": len(value), "ids": 1}.get(shape, len(value))
    assert all(isinstance(text, str) for text in texts)


@SETTINGS
@given(st.lists(embedding_items, min_size=2, max_size=6))
@example(["a", 1])
@example([1, [1]])
@example([["a"]])
@example([[1], "a"])
@example([True])
@example([1.0])
def test_embedding_request_rejects_every_other_list(value):
    assume(_shape(value) is None)
    with pytest.raises(msgspec.ValidationError):
        _decode_embedding(value)


@SETTINGS
@given(st.one_of(json_scalars.filter(lambda v: not isinstance(v, str)), st.just([])))
def test_embedding_request_rejects_non_list_non_string_inputs(value):
    with pytest.raises(msgspec.ValidationError):
        _decode_embedding(value)
