"""Request signatures (RFC 9421 subset, RFC 9530 Content-Digest) and the nonce cache.

The building blocks are checked against the RFCs' own test vectors; then sign → verify round
trips, every kind of tampering, replays, and property tests that no change to a signed request
goes unnoticed and that garbage headers only ever raise SignatureError.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote, unquote

import http_sf
import httpx
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from litestar import Request
from litestar.datastructures import Headers as LitestarHeaders

from federation import httpsig
from federation.httpsig import (
    COVERED_COMPONENTS,
    LABEL,
    ParsedSignature,
    SignatureBusy,
    SignatureError,
    authority_and_path,
    content_digest,
    covered_components,
    field_values,
    parse_signature,
    serialize_params,
    sign_request,
    signature_base,
    verify_request,
)
from federation.identity import NodeIdentity
from federation.nonces import NonceCache, NonceCacheFull
from node.errors import HubError
from node.ingress.errors import openai_error, openai_status
from node.peers.auth import pinned_to, verify_signed

SETTINGS = settings(max_examples=200, deadline=None, database=None)

# --- RFC 9421 Appendix B.1.4 (test-key-ed25519) and B.2.6 (Signing a Request Using ed25519) ----

RFC_PRIVATE_KEY_PEM = """-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF
-----END PRIVATE KEY-----"""
RFC_PUBLIC_KEY_PEM = """-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAJrQLj5P/89iXES9+vFgrIy29clF9CC/oPPsw3c5D0bs=
-----END PUBLIC KEY-----"""

# The test request of RFC 9421 Appendix B.2.
RFC_METHOD = "POST"
RFC_URL = "http://example.com/foo?param=Value&Pet=dog"
RFC_BODY = b'{"hello": "world"}'
RFC_HEADERS = {
    "Host": "example.com",
    "Date": "Tue, 20 Apr 2021 02:07:55 GMT",
    "Content-Type": "application/json",
    "Content-Digest": "sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+"
    "AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:",
    "Content-Length": "18",
}
B26_COMPONENTS = ("date", "@method", "@path", "@authority", "content-type", "content-length")
B26_SIGNATURE_INPUT = (
    'sig-b26=("date" "@method" "@path" "@authority" "content-type" "content-length")'
    ';created=1618884473;keyid="test-key-ed25519"'
)
B26_SIGNATURE = (
    "sig-b26=:wqcAqbmYJ2ji2glfAMaRy4gruYYnx2nEFN2HN6jrnDnQCK1u02Gb04v9EDgwUPiu4A0w6vuQ"
    "v5lIp5WPpBKRCw==:"
)
B26_SIGNATURE_BASE = (
    '"date": Tue, 20 Apr 2021 02:07:55 GMT\n'
    '"@method": POST\n'
    '"@path": /foo\n'
    '"@authority": example.com\n'
    '"content-type": application/json\n'
    '"content-length": 18\n'
    '"@signature-params": ("date" "@method" "@path" "@authority" "content-type" '
    '"content-length");created=1618884473;keyid="test-key-ed25519"'
)


def pem_der(pem: str) -> bytes:
    return base64.b64decode("".join(line for line in pem.splitlines() if "-----" not in line))


def rfc_signing_key() -> nacl.signing.SigningKey:
    der = pem_der(RFC_PRIVATE_KEY_PEM)
    # PKCS#8 for Ed25519: a fixed 16-byte prefix, then the 32-byte seed.
    assert der[:16] == bytes.fromhex("302e020100300506032b657004220420")
    return nacl.signing.SigningKey(der[16:])


def rfc_public_key() -> bytes:
    der = pem_der(RFC_PUBLIC_KEY_PEM)
    assert der[:12] == bytes.fromhex("302a300506032b6570032100")
    return der[12:]


def test_rfc9421_test_key_pair_matches() -> None:
    assert bytes(rfc_signing_key().verify_key) == rfc_public_key()


def test_rfc9421_b26_signature_base() -> None:
    fields = field_values(RFC_HEADERS)
    components = covered_components(RFC_METHOD, RFC_URL, fields, B26_COMPONENTS)
    params = serialize_params(B26_COMPONENTS, {"created": 1618884473, "keyid": "test-key-ed25519"})
    assert "sig-b26=" + params == B26_SIGNATURE_INPUT
    assert signature_base(components, params) == B26_SIGNATURE_BASE.encode()


def test_rfc9421_b26_signature_value() -> None:
    signature = rfc_signing_key().sign(B26_SIGNATURE_BASE.encode()).signature
    expected = B26_SIGNATURE.removeprefix("sig-b26=:").removesuffix(":")
    assert base64.b64encode(signature).decode() == expected


def test_rfc9421_b26_signature_parses_and_verifies() -> None:
    headers = {**RFC_HEADERS, "Signature-Input": B26_SIGNATURE_INPUT, "Signature": B26_SIGNATURE}
    fields = field_values(headers)
    parsed = parse_signature(fields, "sig-b26")
    assert parsed.components == B26_COMPONENTS
    assert parsed.params == {"created": 1618884473, "keyid": "test-key-ed25519"}
    base = signature_base(
        covered_components(RFC_METHOD, RFC_URL, fields, parsed.components), parsed.params_text
    )
    assert base == B26_SIGNATURE_BASE.encode()
    nacl.signing.VerifyKey(rfc_public_key()).verify(base, parsed.signature)
    # A single changed header breaks it.
    fields["content-length"] = "19"
    tampered = signature_base(
        covered_components(RFC_METHOD, RFC_URL, fields, parsed.components), parsed.params_text
    )
    with pytest.raises(nacl.exceptions.BadSignatureError):
        nacl.signing.VerifyKey(rfc_public_key()).verify(tampered, parsed.signature)


def test_rfc9421_b26_is_not_an_aihub_signature() -> None:
    headers = {**RFC_HEADERS, "Signature-Input": B26_SIGNATURE_INPUT, "Signature": B26_SIGNATURE}
    with pytest.raises(SignatureError, match="aihub"):
        verify_request(
            RFC_METHOD,
            RFC_URL,
            headers,
            RFC_BODY,
            public_key_for=lambda _: rfc_public_key(),
            nonces=NonceCache(),
            now=1618884473,
        )


# --- RFC 9530 Content-Digest ----------------------------------------------------------------


def test_rfc9530_content_digest_vector() -> None:
    # RFC 9530 §2 / Appendix B: the 18-byte body {"hello": "world"} (the RFC's line break
    # is only the end of its example, not part of the content).
    assert content_digest(RFC_BODY) == "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"


def test_content_digest_of_empty_body() -> None:
    assert content_digest(b"") == "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:"


# --- derived components -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "authority", "path"),
    [
        ("https://example.com/foo?x=1", "example.com", "/foo"),
        ("https://Example.COM", "example.com", "/"),
        ("https://example.com?x=1", "example.com", "/"),
        ("https://example.com:443/a", "example.com", "/a"),
        ("http://example.com:80/a", "example.com", "/a"),
        ("HTTP://EXAMPLE.com:80/a", "example.com", "/a"),
        ("http://example.com:443/a", "example.com:443", "/a"),
        (
            "https://example.com:8787/v1/chat/completions",
            "example.com:8787",
            "/v1/chat/completions",
        ),
        ("https://[::1]:8443/x", "[::1]:8443", "/x"),
        ("https://10.0.0.7/x", "10.0.0.7", "/x"),
        ("http://h/a b", "h", "/a%20b"),
        ("http://h/%7efoo/%2f/%e2%82%ac", "h", "/~foo/%2F/%E2%82%AC"),
        ("http://h/€", "h", "/%E2%82%AC"),
        ("http://h/a/../b", "h", "/b"),
    ],
)
def test_authority_and_path(url: str, authority: str, path: str) -> None:
    assert authority_and_path(url) == (authority, path)


@pytest.mark.parametrize(
    "url", ["/relative/path", "not a url", "http://h:abc/", "http:///x", "http://[::1/x"]
)
def test_authority_and_path_refuses_bad_urls(url: str) -> None:
    with pytest.raises(ValueError):
        authority_and_path(url)


@pytest.mark.parametrize("value", ["a\nb", "a\r\nb", "é", "a\x00b"])
def test_signature_base_refuses_values_that_would_forge_lines(value: str) -> None:
    with pytest.raises(ValueError):
        signature_base([("x", value)], "()")


def test_field_values_folds_case_and_repeated_fields() -> None:
    headers = LitestarHeaders([(b"x-a", b" 1 "), (b"x-a", b"2"), (b"X-B", b"3")])
    assert field_values(headers) == {"x-a": "1, 2", "x-b": "3"}
    assert field_values({"X-A": "1", "x-a": "2"}) == {"x-a": "1, 2"}


# --- sign → verify ------------------------------------------------------------------------------

NOW = 1_750_000_000
ALICE = NodeIdentity(nacl.signing.SigningKey(bytes(range(32))))
BOB = NodeIdentity(nacl.signing.SigningKey(bytes(range(1, 33))))
KEYS = {ALICE.node_id: bytes(ALICE.verify_key), BOB.node_id: bytes(BOB.verify_key)}
URL = "https://peer.example:8787/v1/chat/completions"
BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'


def known(keyid: str) -> bytes | None:
    return KEYS.get(keyid)


def signed(
    identity: NodeIdentity = ALICE,
    method: str = "POST",
    url: str = URL,
    body: bytes = BODY,
    **kwargs: Any,
) -> dict[str, str]:
    headers = {
        "aihub-request-id": "req-0123456789",
        "authorization": "Bearer sk-x",
        "content-type": "application/json",
    }
    headers.update(sign_request(identity, method, url, headers, body, now=NOW, **kwargs))
    return headers


def verify(
    headers: Any,
    method: str = "POST",
    url: str = URL,
    body: bytes = BODY,
    nonces: NonceCache | None = None,
    now: int = NOW,
    public_key_for: Callable[[str], bytes | None] = known,
) -> str:
    return verify_request(
        method,
        url,
        headers,
        body,
        public_key_for=public_key_for,
        nonces=NonceCache() if nonces is None else nonces,
        now=now,
    )


def test_sign_request_headers() -> None:
    headers = signed(nonce="n" * 22)
    assert headers["content-digest"] == content_digest(BODY)
    assert headers["signature-input"] == (
        'aihub=("@method" "@authority" "@path" "content-digest" "aihub-request-id")'
        f';created={NOW};expires={NOW + 60};nonce="{"n" * 22}";keyid="{ALICE.node_id}"'
        ';alg="ed25519"'
    )
    assert headers["signature"].startswith("aihub=:") and headers["signature"].endswith(":")
    fields = field_values(headers)
    base = signature_base(
        covered_components("POST", URL, fields, COVERED_COMPONENTS),
        headers["signature-input"].removeprefix("aihub="),
    )
    assert base.decode().splitlines()[:5] == [
        '"@method": POST',
        '"@authority": peer.example:8787',
        '"@path": /v1/chat/completions',
        f'"content-digest": {content_digest(BODY)}',
        '"aihub-request-id": req-0123456789',
    ]
    signature = base64.b64decode(headers["signature"][len("aihub=:") : -1])
    ALICE.verify_key.verify(base, signature)


def test_sign_request_nonces_are_random_and_long() -> None:
    nonces = {parse_signature(field_values(signed()), LABEL).params["nonce"] for _ in range(50)}
    assert len(nonces) == 50
    for nonce in nonces:
        assert len(nonce) >= 22  # 128 bits in unpadded base64url
        assert set(nonce) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_sign_request_needs_a_request_id() -> None:
    with pytest.raises(ValueError, match="aihub-request-id"):
        sign_request(ALICE, "POST", URL, {"content-type": "application/json"}, BODY)
    with pytest.raises(ValueError, match="aihub-request-id"):
        sign_request(ALICE, "POST", URL, {"aihub-request-id": ""}, BODY)


def test_sign_request_finds_the_request_id_in_any_case() -> None:
    headers = {"AIHub-Request-ID": "r-1"}
    headers.update(sign_request(ALICE, "GET", URL, headers, b"", now=NOW))
    assert verify(headers, method="GET", body=b"") == ALICE.node_id


def test_round_trip() -> None:
    assert verify(signed(), nonces=NonceCache()) == ALICE.node_id
    assert verify(signed(BOB)) == BOB.node_id


def test_round_trip_with_default_clock() -> None:
    headers = {"aihub-request-id": "r"}
    headers.update(sign_request(ALICE, "POST", URL, headers, BODY))
    keyid = verify_request("POST", URL, headers, BODY, public_key_for=known, nonces=NonceCache())
    assert keyid == ALICE.node_id


@pytest.mark.parametrize(
    "wrap",
    [
        lambda h: h,
        lambda h: {name.title(): value for name, value in h.items()},
        lambda h: {name.upper(): value for name, value in h.items()},
        httpx.Headers,
        lambda h: LitestarHeaders([(k.encode(), v.encode()) for k, v in h.items()]),
    ],
    ids=["dict", "title-case", "upper-case", "httpx", "litestar"],
)
def test_header_lookup_is_case_insensitive(wrap: Callable[[dict[str, str]], Any]) -> None:
    assert verify(wrap(signed())) == ALICE.node_id


def test_receiver_sees_the_url_as_an_asgi_server_rebuilds_it() -> None:
    # The sender's URL as httpx sends it; the receiver's as Litestar rebuilds it from the ASGI
    # scope: default port dropped, host case, percent-decoded path, query kept or not.
    headers = signed(url="https://Peer.Example:443/v1/a%20b/%C3%A9?x=1")
    assert verify(headers, url="https://peer.example/v1/a b/é?x=1") == ALICE.node_id
    headers = signed(method="post")
    assert verify(headers, method="POST") == ALICE.node_id


def test_unknown_signer() -> None:
    with pytest.raises(SignatureError, match="unknown"):
        verify(signed(NodeIdentity.generate()))
    with pytest.raises(SignatureError, match="unknown"):
        verify(signed(), public_key_for=lambda _: None)


def test_replay_is_refused() -> None:
    nonces = NonceCache()
    headers = signed()
    assert verify(headers, nonces=nonces) == ALICE.node_id
    with pytest.raises(SignatureError, match="replay"):
        verify(headers, nonces=nonces)
    with pytest.raises(SignatureError, match="replay"):
        verify(headers, nonces=nonces, now=NOW + 60)
    # Another request, or the same nonce from another signer, is not a replay.
    assert verify(signed(), nonces=nonces) == ALICE.node_id
    nonce = parse_signature(field_values(headers), LABEL).params["nonce"]
    assert verify(signed(BOB, nonce=nonce), nonces=nonces) == BOB.node_id


def test_forged_requests_do_not_use_up_nonces() -> None:
    nonces = NonceCache()
    headers = signed()
    with pytest.raises(SignatureError, match="does not verify"):
        verify(headers, nonces=nonces, method="PUT")
    assert len(nonces) == 0
    assert verify(headers, nonces=nonces) == ALICE.node_id


def test_full_nonce_cache_refuses_instead_of_forgetting() -> None:
    nonces = NonceCache(max_entries=2)
    first = signed(ttl=1)
    verify(first, nonces=nonces)
    verify(signed(ttl=1), nonces=nonces)
    headers = signed()
    with pytest.raises(SignatureBusy, match="nonce cache"):
        verify(headers, nonces=nonces)
    with pytest.raises(SignatureError, match="replay") as replay:
        verify(first, nonces=nonces, now=NOW + 1)
    assert not isinstance(replay.value, SignatureBusy)
    # Once the first two signatures have expired (the clock skew allowance included), there is
    # room again.
    assert verify(headers, nonces=nonces, now=NOW + 1 + 301) == ALICE.node_id


def custom(
    components: tuple[str, ...] = COVERED_COMPONENTS,
    params: dict[str, Any] | None = None,
    label: str = LABEL,
    identity: NodeIdentity = ALICE,
    method: str = "POST",
    url: str = URL,
    body: bytes = BODY,
) -> dict[str, str]:
    """A request correctly signed by `identity`, with any components, parameters and label."""
    if params is None:
        params = {
            "created": NOW,
            "expires": NOW + 60,
            "nonce": "abcdefghijklmnopqrstuv",
            "keyid": identity.node_id,
            "alg": "ed25519",
        }
    headers = {
        "aihub-request-id": "req-1",
        "content-digest": content_digest(body),
        "content-type": "application/json",
    }
    params_text = serialize_params(components, params)
    base = signature_base(
        covered_components(method, url, field_values(headers), components), params_text
    )
    signature = base64.b64encode(identity.sign(base)).decode()
    headers["signature-input"] = f"{label}={params_text}"
    headers["signature"] = f"{label}=:{signature}:"
    return headers


def test_custom_signer_is_accepted_as_is() -> None:
    assert verify(custom()) == ALICE.node_id
    # Order of components and parameters is free, and alg may be left out.
    reordered = tuple(reversed(COVERED_COMPONENTS))
    params = {"keyid": ALICE.node_id, "nonce": "n" * 16, "expires": NOW + 1, "created": NOW}
    assert verify(custom(reordered, params)) == ALICE.node_id


def with_params(**changes: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "created": NOW,
        "expires": NOW + 60,
        "nonce": "abcdefghijklmnopqrstuv",
        "keyid": ALICE.node_id,
        "alg": "ed25519",
    }
    params.update(changes)
    return {name: value for name, value in params.items() if value is not None}


def replace(headers: dict[str, str], name: str, old: str, new: str) -> dict[str, str]:
    assert old in headers[name]
    return {**headers, name: headers[name].replace(old, new)}


def flip_signature_byte(headers: dict[str, str]) -> dict[str, str]:
    raw = bytearray(base64.b64decode(headers["signature"][len("aihub=:") : -1]))
    raw[10] ^= 1
    return {**headers, "signature": f"aihub=:{base64.b64encode(raw).decode()}:"}


def without(headers: dict[str, str], name: str) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k != name}


SIGNED = signed()
TAMPERING: dict[str, tuple[Callable[[], dict[str, Any]], str]] = {
    # name: (a function giving verify()'s arguments, a fragment of the expected message)
    "method": (lambda: {"headers": SIGNED, "method": "PUT"}, "does not verify"),
    "authority": (
        lambda: {"headers": SIGNED, "url": URL.replace("8787", "8788")},
        "does not verify",
    ),
    "host": (
        lambda: {"headers": SIGNED, "url": URL.replace("peer.", "evil.")},
        "does not verify",
    ),
    "path": (lambda: {"headers": SIGNED, "url": URL + "/x"}, "does not verify"),
    "body": (lambda: {"headers": SIGNED, "body": BODY + b" "}, "content-digest"),
    "digest and body": (
        lambda: {
            "headers": {**SIGNED, "content-digest": content_digest(b"{}")},
            "body": b"{}",
        },
        "does not verify",
    ),
    "request id": (
        lambda: {"headers": {**SIGNED, "aihub-request-id": "req-other"}},
        "does not verify",
    ),
    "request id removed": (
        lambda: {"headers": without(SIGNED, "aihub-request-id")},
        "missing header aihub-request-id",
    ),
    "content-digest removed": (
        lambda: {"headers": without(SIGNED, "content-digest")},
        "content-digest",
    ),
    "signature removed": (lambda: {"headers": without(SIGNED, "signature")}, "signature"),
    "signature-input removed": (
        lambda: {"headers": without(SIGNED, "signature-input")},
        "signature-input",
    ),
    "signature byte": (lambda: {"headers": flip_signature_byte(SIGNED)}, "does not verify"),
    "signature truncated": (
        lambda: {"headers": {**SIGNED, "signature": "aihub=:AAAA:"}},
        "not an Ed25519 signature",
    ),
    "keyid swapped": (
        lambda: {"headers": replace(SIGNED, "signature-input", ALICE.node_id, BOB.node_id)},
        "does not verify",
    ),
    "created changed": (
        lambda: {
            "headers": replace(SIGNED, "signature-input", f"created={NOW}", f"created={NOW - 1}")
        },
        "does not verify",
    ),
    "expired": (lambda: {"headers": SIGNED, "now": NOW + 60 + 301}, "expired"),
    "created in the future": (
        lambda: {"headers": signed(), "now": NOW - 301},
        "future",
    ),
    "ttl too long": (lambda: {"headers": signed(ttl=301)}, "longer than 300"),
    "expires before created": (
        lambda: {"headers": custom(params=with_params(expires=NOW - 1)), "now": NOW - 2},
        "expires before",
    ),
    "wrong label": (
        lambda: {
            "headers": {
                **SIGNED,
                "signature-input": SIGNED["signature-input"].replace("aihub=", "other="),
                "signature": SIGNED["signature"].replace("aihub=", "other="),
            }
        },
        "no signature labelled 'aihub'",
    ),
    "label only in one field": (
        lambda: {"headers": replace(SIGNED, "signature", "aihub=", "other=")},
        "no signature labelled",
    ),
    "missing component": (
        lambda: {"headers": custom(components=COVERED_COMPONENTS[:-1])},
        "must cover exactly",
    ),
    "duplicated component": (
        lambda: {"headers": custom(components=(*COVERED_COMPONENTS[:-1], "@method"))},
        "must cover exactly",
    ),
    "extra component": (
        lambda: {"headers": custom(components=(*COVERED_COMPONENTS, "content-type"))},
        "must cover exactly",
    ),
    "component with parameters": (
        lambda: {
            "headers": replace(SIGNED, "signature-input", '"content-digest"', '"content-digest";sf')
        },
        "component parameters",
    ),
    "other algorithm": (
        lambda: {"headers": custom(params=with_params(alg="rsa-pss-sha512"))},
        "algorithm",
    ),
    "no created": (lambda: {"headers": custom(params=with_params(created=None))}, "created"),
    "no expires": (lambda: {"headers": custom(params=with_params(expires=None))}, "expires"),
    "no nonce": (lambda: {"headers": custom(params=with_params(nonce=None))}, "nonce"),
    "no keyid": (lambda: {"headers": custom(params=with_params(keyid=None))}, "keyid"),
    "short nonce": (lambda: {"headers": custom(params=with_params(nonce="abc"))}, "nonce"),
    "created not an integer": (
        lambda: {"headers": custom(params=with_params(created=str(NOW)))},
        "created",
    ),
    "unknown parameter": (
        lambda: {"headers": custom(params=with_params(tag="x"))},
        "unsupported signature parameters",
    ),
    "duplicate label": (
        lambda: {
            "headers": {**SIGNED, "signature": SIGNED["signature"] + ", " + SIGNED["signature"]}
        },
        "duplicate",
    ),
    "signature not bytes": (
        lambda: {"headers": {**SIGNED, "signature": 'aihub="abc"'}},
        "byte sequence",
    ),
    "content-digest without sha-256": (
        lambda: {"headers": custom() | {"content-digest": "sha-512=:AAAA:"}},
        "sha-256",
    ),
}


@pytest.mark.parametrize("case", TAMPERING)
def test_tampering_is_refused(case: str) -> None:
    make, message = TAMPERING[case]
    with pytest.raises(SignatureError, match=message):
        verify(**make())


def test_untampered_baseline_verifies() -> None:
    # The TAMPERING cases start from requests that are valid as they are.
    assert verify(SIGNED) == ALICE.node_id
    assert verify(custom()) == ALICE.node_id
    assert verify(signed(), now=NOW - 300) == ALICE.node_id  # created within the skew
    assert verify(signed(), now=NOW + 60) == ALICE.node_id  # the last valid second
    assert verify(signed(ttl=300)) == ALICE.node_id


# --- properties ---------------------------------------------------------------------------------

segments = st.lists(st.text(max_size=12), max_size=5)
plain_segments = st.lists(
    st.text(st.characters(categories=["L", "N"]) | st.sampled_from(" -._~"), max_size=12),
    max_size=5,
)


@SETTINGS
@given(body=st.binary(max_size=2048), parts=segments, method=st.sampled_from(["GET", "POST"]))
def test_any_body_and_path_round_trips(body: bytes, parts: list[str], method: str) -> None:
    url = "https://peer.example:8787/" + "/".join(quote(part, safe="") for part in parts)
    headers = signed(method=method, url=url, body=body)
    assert verify(headers, method=method, url=url, body=body) == ALICE.node_id


@SETTINGS
@given(parts=plain_segments)
def test_any_path_verifies_as_the_receiver_sees_it(parts: list[str]) -> None:
    path = "/" + "/".join(quote(part, safe="") for part in parts)
    headers = signed(url="https://peer.example" + path + "?q=1")
    assert verify(headers, url="https://peer.example" + unquote(path)) == ALICE.node_id


@SETTINGS
@given(body=st.binary(min_size=1, max_size=512), data=st.data())
def test_any_changed_body_byte_is_refused(body: bytes, data: st.DataObject) -> None:
    headers = signed(body=body)
    index = data.draw(st.integers(0, len(body) - 1))
    delta = data.draw(st.integers(1, 255))
    changed = bytearray(body)
    changed[index] ^= delta
    with pytest.raises(SignatureError, match="content-digest"):
        verify(headers, body=bytes(changed))


@SETTINGS
@given(index=st.integers(0, 63), delta=st.integers(1, 255))
def test_any_changed_signature_byte_is_refused(index: int, delta: int) -> None:
    raw = bytearray(base64.b64decode(SIGNED["signature"][len("aihub=:") : -1]))
    raw[index] ^= delta
    headers = {**SIGNED, "signature": f"aihub=:{base64.b64encode(raw).decode()}:"}
    with pytest.raises(SignatureError, match="does not verify"):
        verify(headers)


FRAGMENTS = [
    "aihub",
    "=",
    "(",
    ")",
    '"',
    ":",
    ";",
    ",",
    " ",
    '"@method"',
    '"@authority"',
    '"@path"',
    '"content-digest"',
    '"aihub-request-id"',
    "created=",
    "expires=",
    "nonce=",
    "keyid=",
    'alg="ed25519"',
    str(NOW),
    "-1",
    "1.5",
    "?1",
    "?0",
    "@1700000000",
    '%"x"',
    "*tok",
    "AAAA",
    "=:",
    "\\",
    "é",
    "\t",
    "\x00",
    "99999999999999999",
    f'"{ALICE.node_id}"',
]
garbage = st.text() | st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join)


@SETTINGS
@given(signature_input=garbage, signature=garbage, digest=garbage | st.just(content_digest(BODY)))
def test_garbage_headers_only_raise_signature_error(
    signature_input: str, signature: str, digest: str
) -> None:
    headers = {
        **SIGNED,
        "signature-input": signature_input,
        "signature": signature,
        "content-digest": digest,
    }
    with pytest.raises(SignatureError):
        verify(headers)


@SETTINGS
@given(
    name=st.sampled_from(["signature-input", "signature", "content-digest"]),
    data=st.data(),
)
def test_mutated_headers_only_raise_signature_error(name: str, data: st.DataObject) -> None:
    value = SIGNED[name]
    start = data.draw(st.integers(0, len(value)))
    end = data.draw(st.integers(start, min(len(value), start + 4)))
    insert = data.draw(st.sampled_from(FRAGMENTS) | st.text(max_size=3))
    headers = {**SIGNED, name: value[:start] + insert + value[end:]}
    with contextlib.suppress(SignatureError):
        assert verify(headers) == ALICE.node_id  # e.g. only whitespace was added


# --- the nonce cache ------------------------------------------------------------------------------


def test_nonce_cache_remembers_until_expiry() -> None:
    cache = NonceCache()
    assert cache.remember("k", "n", expires=100, now=50)
    assert not cache.remember("k", "n", expires=100, now=60)
    assert not cache.remember("k", "n", expires=100, now=100)  # still valid at `expires`
    assert cache.remember("k2", "n", expires=100, now=60)  # per signer
    assert cache.remember("k", "n", expires=200, now=101)  # forgotten once expired
    assert not cache.remember("k", "n", expires=200, now=150)


def test_nonce_cache_prunes_expired_entries() -> None:
    cache = NonceCache()
    for i in range(100):
        assert cache.remember("k", f"n{i}", expires=i, now=0)
    assert len(cache) == 100
    cache.remember("k", "other", expires=1000, now=50)
    assert len(cache) == 51  # n50..n99 and "other"
    cache.remember("k", "last", expires=1000, now=500)
    assert len(cache) == 2


def test_nonce_cache_does_not_store_already_expired_nonces() -> None:
    cache = NonceCache()
    assert cache.remember("k", "n", expires=10, now=20)
    assert len(cache) == 0


def test_nonce_cache_is_bounded_and_fails_closed() -> None:
    cache = NonceCache(max_entries=3)
    for i in range(3):
        assert cache.remember("k", f"n{i}", expires=100 + i, now=0)
    with pytest.raises(NonceCacheFull):
        cache.remember("k", "n3", expires=100, now=0)
    # Nothing was forgotten to make room: the old nonces are still refused.
    for i in range(3):
        assert not cache.remember("k", f"n{i}", expires=100 + i, now=1)
    # Once the oldest expires there is room again.
    assert cache.remember("k", "n3", expires=200, now=101)
    assert len(cache) == 3  # n1 (expires 101), n2 (102), n3


def test_nonce_cache_rejects_a_silly_bound() -> None:
    with pytest.raises(ValueError):
        NonceCache(max_entries=0)


@SETTINGS
@given(
    events=st.lists(
        st.tuples(st.sampled_from("ab"), st.sampled_from("xyz"), st.integers(0, 30)), max_size=60
    )
)
def test_nonce_cache_agrees_with_a_simple_model(events: list[tuple[str, str, int]]) -> None:
    cache = NonceCache()
    model: dict[tuple[str, str], int] = {}
    for now, (keyid, nonce, ttl) in enumerate(events, start=1):
        expected = not (model.get((keyid, nonce), -1) >= now)
        assert cache.remember(keyid, nonce, now + ttl, now) is expected
        if expected:
            model[(keyid, nonce)] = now + ttl
        assert len(cache) == sum(1 for expiry in model.values() if expiry >= now)


def test_content_digest_must_be_a_byte_sequence() -> None:
    # The sha-256 member must be the digest itself, not its hex or another encoding.
    hexdigest = hashlib.sha256(BODY).hexdigest()
    headers = custom() | {"content-digest": f'sha-256="{hexdigest}"'}
    with pytest.raises(SignatureError, match="sha-256"):
        verify(headers)


# --- the parser for our own form, against the general Structured Fields parser -----------------

sf_keys = st.from_regex(r"[a-z*][a-z0-9_.*-]{0,6}", fullmatch=True)
sf_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)
sf_params = st.dictionaries(sf_keys, st.integers(-(10**15) + 1, 10**15 - 1) | sf_text, max_size=6)


def _general_or_none(fields: dict[str, str], label: str) -> ParsedSignature | None:
    try:
        return httpsig._parse_general(fields, label)
    except SignatureError:
        return None


@settings(max_examples=300)
@given(
    components=st.lists(sf_text, max_size=6),
    params=sf_params,
    signature=st.binary(max_size=70),
    label=st.sampled_from([LABEL, "sig1"]),
)
def test_our_form_parses_as_structured_fields_do(
    components: list[str], params: dict[str, int | str], signature: bytes, label: str
) -> None:
    """Whatever the fast parser accepts, http-sf reads the same way; and it accepts every
    well-formed field whose strings need no escapes."""
    fields = {
        "signature-input": f"{label}={serialize_params(components, params)}",
        "signature": f"{label}=:{base64.b64encode(signature).decode()}:",
    }
    ours = httpsig._parse_ours(fields, LABEL)
    assert ours is None or ours == _general_or_none(fields, LABEL)
    plain = all('"' not in t and "\\" not in t for t in [*components, *map(str, params.values())])
    if label == LABEL and plain:
        assert ours is not None


@settings(max_examples=500)
@given(data=st.data())
def test_a_mangled_field_is_never_read_differently(data: st.DataObject) -> None:
    """Characters inserted, removed or changed anywhere: the fast parser either gives way to
    http-sf or reads exactly what http-sf reads (never accepts what it refuses)."""
    fields = {name: value for name, value in SIGNED.items() if name.startswith("signature")}
    name = data.draw(st.sampled_from(sorted(fields)))
    value = fields[name]
    at = data.draw(st.integers(0, len(value)))
    cut = data.draw(st.integers(0, 3))
    insert = data.draw(st.text(st.sampled_from(' ()";=:-,0123456789az\\*+/'), max_size=3))
    fields[name] = value[:at] + insert + value[at + cut :]
    ours = httpsig._parse_ours(fields, LABEL)
    assert ours is None or ours == _general_or_none(fields, LABEL)


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _stray_bit(field: str) -> str:
    """The same bytes with a padding bit set: the last character before `==` carries two bits
    of the signature and four that must be zero."""
    last = _B64.index(field[-4])
    assert last & 0b1111 == 0
    return field[:-4] + _B64[last | 1] + field[-3:]


NOT_OURS: dict[str, Callable[[dict[str, str]], dict[str, str]]] = {
    # Each is a form our signers never write; the fast parser must give way to http-sf.
    "leading zero": lambda f: {
        **f,
        "signature-input": f["signature-input"].replace(";created=", ";created=0"),
    },
    "minus zero": lambda f: {**f, "signature-input": f["signature-input"] + ";x=-0"},
    "repeated parameter": lambda f: {**f, "signature-input": f["signature-input"] + ';alg="x"'},
    "unquoted token": lambda f: {**f, "signature-input": f["signature-input"] + ";x=token"},
    "boolean parameter": lambda f: {**f, "signature-input": f["signature-input"] + ";x"},
    "escaped string": lambda f: {**f, "signature-input": f["signature-input"] + ';x="a\\"b"'},
    "two spaces": lambda f: {**f, "signature-input": f["signature-input"].replace(" ", "  ", 1)},
    "space inside the list": lambda f: {
        **f,
        "signature-input": f["signature-input"].replace("(", "( ", 1),
    },
    "second member": lambda f: {**f, "signature-input": f["signature-input"] + ', b=("x")'},
    "other label": lambda f: {
        **f,
        "signature-input": f["signature-input"].replace(LABEL, "sig1", 1),
        "signature": f["signature"].replace(LABEL, "sig1", 1),
    },
    "unpadded base64": lambda f: {**f, "signature": f["signature"].replace("=:", ":")},
    "base64 with stray bits": lambda f: {**f, "signature": _stray_bit(f["signature"])},
    "urlsafe base64": lambda f: {
        **f,
        "signature": f["signature"].replace("=:", "=:-", 1),  # `-`: base64url, not base64
    },
}


@pytest.mark.parametrize("case", sorted(NOT_OURS))
def test_forms_we_never_write_go_to_the_general_parser(case: str) -> None:
    fields = {name: value for name, value in SIGNED.items() if name.startswith("signature")}
    changed = NOT_OURS[case](fields)
    assert changed != fields
    assert httpsig._parse_ours(changed, LABEL) is None
    assert httpsig._parse_ours(fields, LABEL) == httpsig._parse_general(fields, LABEL)


@settings(max_examples=300)
@given(components=st.lists(sf_text, max_size=6), params=sf_params)
def test_signature_params_are_serialised_as_structured_fields_do(
    components: list[str], params: dict[str, int | str]
) -> None:
    general = http_sf.ser({"x": ([(name, {}) for name in components], params)})
    assert serialize_params(components, params) == general.removeprefix("x=")


def test_a_full_nonce_cache_tells_a_peer_to_retry_not_that_its_signature_is_bad() -> None:
    """Through the node's check: 503 with retry-after (the consumer backs off and retries),
    where a bad or replayed signature is a 401."""
    url = "http://peer.example:8787/v1/chat/completions"

    async def claim(pair: bytes, expires: int, now: int) -> bool:
        return True  # this test is about the memory in front of the store

    hub = SimpleNamespace(
        nonces=NonceCache(max_entries=1), nonce_claims=SimpleNamespace(claim=claim)
    )

    def check(headers: dict[str, str]) -> str:
        raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        scope = {
            "type": "http",
            "method": "POST",
            "scheme": "http",
            "server": ("peer.example", 8787),
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"peer.example:8787"), *raw],
        }
        checked = verify_signed(hub, Request(scope), BODY, pinned_to(ALICE.node_id))  # type: ignore[arg-type]
        return asyncio.run(checked)

    def signed_now(request_id: str) -> dict[str, str]:
        headers = {"aihub-request-id": request_id}
        return headers | sign_request(ALICE, "POST", url, headers, BODY)

    first = signed_now("req_1")
    assert check(first) == ALICE.node_id
    with pytest.raises(HubError) as busy:
        check(signed_now("req_2"))
    assert openai_status(busy.value) == 503
    assert openai_error(busy.value).headers["retry-after"] == "2"
    with pytest.raises(HubError) as replayed:
        check(first)
    assert openai_status(replayed.value) == 401


# --- the digest as our signers write it, and as anyone else may -------------------------------


@SETTINGS
@given(body=st.binary(max_size=512))
def test_the_digest_reads_the_same_in_our_form_and_in_the_general_parser_s(body: bytes) -> None:
    ours = content_digest(body)
    httpsig._check_digest(ours, body)  # our form, read without the general parser
    # The same member among others, or with a parameter: the general parser reads it.
    digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
    for spelling in (f"sha-512=:AAAA:, {ours}", f"sha-256=:{digest}:;p=1", f" {ours}"):
        assert httpsig._OUR_DIGEST.fullmatch(spelling) is None
        httpsig._check_digest(spelling, body)
    with pytest.raises(SignatureError, match="does not match"):
        httpsig._check_digest(ours, body + b"x")


def test_a_digest_in_a_spelling_that_is_not_canonical_is_not_read_as_ours() -> None:
    # 32 bytes end in a base64 character whose two low bits are zero: any other last
    # character spells the same bytes another way, left to the general parser to judge.
    canonical = content_digest(b"")
    assert canonical[-3] == "U"
    other = canonical[:-3] + "V=:"
    assert httpsig._OUR_DIGEST.fullmatch(other) is None
    with pytest.raises(SignatureError):
        httpsig._check_digest(other, b"x")


def test_a_signature_s_nonce_comes_from_the_pool_not_a_system_call_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each signed request's nonce: 16 random bytes, url-safe base64 as `secrets.token_urlsafe`
    spells them, never the same twice, drawn from `federation/ids.py`'s pool (a `getrandom`
    per 4 KB, not one per request)."""
    import os
    import re
    import secrets

    def refused(*_: object) -> str:
        raise AssertionError("a system call per nonce")

    monkeypatch.setattr(secrets, "token_urlsafe", refused)
    drawn: list[int] = []
    real = os.urandom
    monkeypatch.setattr(os, "urandom", lambda n: drawn.append(n) or real(n))
    nonces = set()
    for _ in range(50):
        params = httpsig.parse_signature(signed(), httpsig.LABEL).params
        nonces.add(params["nonce"])
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", params["nonce"])
    assert len(nonces) == 50 and len(drawn) <= 1
    assert verify(signed(), nonces=NonceCache()) == ALICE.node_id
