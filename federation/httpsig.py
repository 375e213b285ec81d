"""Request signatures between nodes: the subset of RFC 9421 (HTTP Message Signatures) aihub uses.

A node signs every request it sends to a peer with its node key (Ed25519), covering

    "@method" "@authority" "@path" "content-digest" "aihub-request-id"

where `content-digest` is the RFC 9530 sha-256 digest of the body, and the parameters
`created`, `expires`, `nonce`, `keyid` (the node id) and `alg="ed25519"`, under the label
`aihub`:

    Content-Digest: sha-256=:<base64>:
    Signature-Input: aihub=("@method" "@authority" "@path" "content-digest" \
        "aihub-request-id");created=1700000000;expires=1700000060;nonce="...";\
        keyid="ed25519:...";alg="ed25519"
    Signature: aihub=:<base64 of the 64-byte Ed25519 signature>:

The receiver rebuilds the signature base (RFC 9421 §2.5) from the request it got, checks the
time window, the body digest and the signature, and refuses a nonce it has seen for as long
as the signature could be accepted (`expires` plus the allowed skew), so that a captured
request cannot be replayed. `verify_request` keeps that memory in one process; a node records
nonces in its store (`check_request`, then `node.peers.auth`), shared by all its processes and
kept across restarts.

`@authority` and `@path` are derived from the URL the same way on both sides (parsed as httpx
parses it, so what is signed is what goes on the wire): host lowercased, default ports (80 for
http, 443 for https) omitted, path without query, empty path as "/", percent-encoding normalised
(hex digits uppercased, unreserved characters decoded). A path that contains an encoded "/" or
"?" is seen decoded by ASGI servers and will not verify; aihub's own paths never do.

Signature-Input, Signature and Content-Digest are parsed as RFC 8941/9651 structured fields with
`http-sf`, the maintained reference implementation by the specification's editor.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import http_sf
import httpx
import nacl.exceptions
import nacl.signing

from federation.identity import NodeIdentity
from federation.ids import random_urlsafe
from federation.nonces import NonceCache, NonceCacheFull

LABEL = "aihub"
ALG = "ed25519"
REQUEST_ID_HEADER = "aihub-request-id"
COVERED_COMPONENTS: tuple[str, ...] = (
    "@method",
    "@authority",
    "@path",
    "content-digest",
    REQUEST_ID_HEADER,
)
_ALLOWED_PARAMS = frozenset({"created", "expires", "nonce", "keyid", "alg"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
# Field values allowed in a signature base: visible ASCII, space and tab. Anything else
# (notably CR and LF, which would forge extra lines) is refused.
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*")
_COMPONENT_NAME = re.compile(r"@?[a-z0-9!#$%&'*+.^_`|~-]+")
_NONCE_MIN, _NONCE_MAX = 16, 128
_ED25519_SIGNATURE_BYTES = 64


class SignatureError(ValueError):
    """A request signature is missing, malformed, stale, replayed or does not verify."""


class SignatureBusy(SignatureError):
    """A signature that verifies, refused only because the nonce cache is full for now: the
    sender should try again shortly, not conclude that its key is wrong."""


@dataclass(frozen=True, slots=True)
class ParsedSignature:
    """One labelled signature from the Signature-Input and Signature fields."""

    label: str
    components: tuple[str, ...]
    params: dict[str, Any]
    # The inner list with its parameters, re-serialised canonically (RFC 9421 §2.3): the value
    # of the "@signature-params" line of the signature base.
    params_text: str
    signature: bytes


# --- building blocks --------------------------------------------------------------------------


def content_digest(body: bytes) -> str:
    """The RFC 9530 Content-Digest field value of `body`, with sha-256."""
    digest = base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")
    return f"sha-256=:{digest}:"


def signature_base(components: Sequence[tuple[str, str]], params: str) -> bytes:
    """The RFC 9421 §2.5 signature base for `components` ((name, value) pairs, in the order
    they are covered) and `params` (the serialised inner list, as in Signature-Input)."""
    pairs = [*components, ("@signature-params", params)]
    # The usual case in two checks: every name valid (the few names there are, cached), and
    # no value with a character outside the class (their concatenation has none).
    if all(_valid_name(name) for name, _ in pairs) and _FIELD_VALUE.fullmatch(
        "".join(value for _, value in pairs)
    ):
        return "\n".join(f'"{name}": {value}' for name, value in pairs).encode("ascii")
    for name, value in pairs:  # which line cannot be signed, in order
        if not _COMPONENT_NAME.fullmatch(name):
            raise ValueError(f"invalid component name {name!r}")
        if not _FIELD_VALUE.fullmatch(value):
            raise ValueError(f"component {name} has a value that cannot be signed")
    raise AssertionError("unreachable")  # pragma: no cover


@functools.lru_cache(maxsize=256)
def _valid_name(name: str) -> bool:
    return _COMPONENT_NAME.fullmatch(name) is not None


def serialize_params(components: Iterable[str], params: Mapping[str, int | str]) -> str:
    """The Signature-Input member value: the covered components and their parameters."""
    names = list(components)
    plain = _plain_params(names, params)
    if plain is not None:
        return plain
    serialized = http_sf.ser({"x": ([(name, {}) for name in names], dict(params))})
    return serialized.removeprefix("x=")


def _plain_params(names: list[str], params: Mapping[str, int | str]) -> str | None:
    """`serialize_params` written out directly when every value is a canonical integer or a
    string that needs no escape (what we sign); None otherwise."""
    parts = []
    for key, value in params.items():
        if type(value) is int:
            text = str(value)
            if not _SF_INTEGER_RE.fullmatch(text):
                return None
        elif type(value) is str and _SF_STRING_RE.fullmatch(f'"{value}"'):
            text = f'"{value}"'
        else:
            return None
        if not _plain_key(key):
            return None
        parts.append(f";{key}={text}")
    inner = _plain_list(tuple(names))
    return None if inner is None else inner + "".join(parts)


# What a signer covers and names its parameters by is the same few strings every time.
@functools.lru_cache(maxsize=64)
def _plain_key(key: str) -> bool:
    return _SF_KEY_RE.fullmatch(key) is not None


@functools.lru_cache(maxsize=64)
def _plain_list(names: tuple[str, ...]) -> str | None:
    """The inner list of `names` as strings without escapes, or None if one needs one."""
    quoted = [f'"{name}"' for name in names]
    if not all(_SF_STRING_RE.fullmatch(item) for item in quoted):
        return None
    return f"({' '.join(quoted)})"


@functools.lru_cache(maxsize=1024)
def authority_and_path(url: str) -> tuple[str, str]:
    """The RFC 9421 `@authority` and `@path` of an absolute URL. Cached: a node signs and
    checks the same few URLs over and over, and parsing one costs more than the signature."""
    try:
        parsed = httpx.URL(url)
        host = parsed.raw_host.decode("ascii").lower()
        port = parsed.port
        raw_path = parsed.raw_path.decode("ascii")
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise ValueError(f"invalid URL: {exc}") from exc
    if not host:
        raise ValueError("URL has no host")
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    if port is not None and port != _DEFAULT_PORTS.get(parsed.scheme.lower()):
        host = f"{host}:{port}"
    path = raw_path.split("?", 1)[0] or "/"
    return host, _PERCENT.sub(_normalize_percent, path)


def _normalize_percent(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def field_values(headers: Mapping[str, str]) -> dict[str, str]:
    """Header fields by lowercased name, each field's values trimmed and joined with ", "
    (RFC 9421 §2.1). Works for plain dicts, httpx.Headers and Litestar's multi-dict headers."""
    items = list(headers.items())
    # The usual case, on every signed request: no field given twice (nothing to join).
    single = {name.lower(): value.strip(" \t") for name, value in items}
    if len(single) == len(items):
        return single
    values: dict[str, list[str]] = {}
    for name, value in items:
        values.setdefault(name.lower(), []).append(value.strip(" \t"))
    return {name: ", ".join(parts) for name, parts in values.items()}


def covered_components(
    method: str, url: str, fields: Mapping[str, str], names: Iterable[str]
) -> list[tuple[str, str]]:
    """(name, value) of each covered component of a request; `fields` as from `field_values`.

    Supports the derived components @method, @authority and @path, and header fields.
    """
    authority, path = authority_and_path(url)
    components = []
    for name in names:
        if name == "@method":
            value = method.upper()
        elif name == "@authority":
            value = authority
        elif name == "@path":
            value = path
        elif name.startswith("@"):
            raise ValueError(f"unsupported derived component {name}")
        elif name in fields:
            value = fields[name]
        else:
            raise ValueError(f"missing header {name}")
        components.append((name, value))
    return components


# The two fields as our own signers write them: one member each, single spaces, canonical
# integers, strings without escapes. Parsed here with three regular expressions, at a fraction
# of the general Structured Fields parser's cost (which was more than the Ed25519 check);
# anything else at all goes to http-sf. By construction, what this accepts is canonical, so
# the Signature-Input member as received is its own re-serialisation.
_SF_STRING = r'"[\x20\x21\x23-\x5b\x5d-\x7e]*"'
_SF_KEY = r"[a-z*][a-z0-9_.*-]*"
_SF_INTEGER = r"(?:0|-?[1-9][0-9]{0,14})"
_OUR_INPUT = re.compile(  # label=(member: (inner list) and parameters)
    rf"({_SF_KEY})=(\(((?:{_SF_STRING}(?: {_SF_STRING})*)?)\)"
    rf"((?:;{_SF_KEY}=(?:{_SF_INTEGER}|{_SF_STRING}))*))"
)
_SF_STRING_RE = re.compile(_SF_STRING)
_SF_KEY_RE = re.compile(_SF_KEY)
_SF_INTEGER_RE = re.compile(_SF_INTEGER)
_OUR_PARAM = re.compile(rf";({_SF_KEY})=({_SF_INTEGER}|{_SF_STRING})")
_OUR_SIGNATURE = re.compile(rf"({_SF_KEY})=:([A-Za-z0-9+/]*={{0,2}}):")
# A sha-256 digest as `content_digest` writes it: 32 bytes are 43 base64 characters, the last
# of them one of the 16 whose low bits are zero, then one `=` (so only the canonical spelling).
_OUR_DIGEST = re.compile(r"sha-256=:([A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=):")


def _parse_ours(fields: Mapping[str, str], label: str) -> ParsedSignature | None:
    """`parse_signature` for fields in our own signers' form; None for any other form."""
    found = _OUR_INPUT.fullmatch(fields.get("signature-input", ""))
    signed = _OUR_SIGNATURE.fullmatch(fields.get("signature", ""))
    if found is None or signed is None or found[1] != label or signed[1] != label:
        return None
    pairs = _OUR_PARAM.findall(found[4])
    params: dict[str, Any] = {
        key: value[1:-1] if value.startswith('"') else int(value) for key, value in pairs
    }
    try:
        signature = base64.b64decode(signed[2], validate=True)
    except ValueError:
        return None
    if len(params) != len(pairs) or base64.b64encode(signature).decode() != signed[2]:
        return None  # a repeated parameter, or base64 not in canonical form
    components = tuple(item[1:-1] for item in _SF_STRING_RE.findall(found[3]))
    return ParsedSignature(label, components, params, found[2], signature)


def parse_signature(fields: Mapping[str, str], label: str) -> ParsedSignature:
    """The signature labelled `label` in the Signature-Input and Signature fields."""
    return _parse_ours(fields, label) or _parse_general(fields, label)


def _parse_general(fields: Mapping[str, str], label: str) -> ParsedSignature:
    inputs = _parse_dictionary(fields, "signature-input")
    signatures = _parse_dictionary(fields, "signature")
    if label not in inputs or label not in signatures:
        raise SignatureError(f"no signature labelled {label!r}")
    member = inputs[label]
    if not (isinstance(member, tuple) and isinstance(member[0], list)):
        raise SignatureError("signature-input member is not an inner list")
    items, params = member
    components = []
    for item in items:
        if not isinstance(item, tuple):
            raise SignatureError("malformed signature-input")
        name, item_params = item
        if type(name) is not str:
            raise SignatureError("covered component names must be strings")
        if item_params:
            raise SignatureError(f"component parameters are not supported ({name})")
        components.append(name)
    signature = signatures[label]
    if not (isinstance(signature, tuple) and type(signature[0]) is bytes) or signature[1]:
        raise SignatureError("signature member is not a byte sequence")
    try:
        params_text = http_sf.ser({"x": member}).removeprefix("x=")
    except Exception as exc:  # e.g. a parameter type that cannot be serialised back
        raise SignatureError(f"malformed signature-input: {exc}") from exc
    return ParsedSignature(label, tuple(components), dict(params), params_text, signature[0])


def _parse_dictionary(fields: Mapping[str, str], name: str) -> dict[str, Any]:
    value = fields.get(name)
    if value is None:
        raise SignatureError(f"missing header {name}")

    def refuse_duplicate(key: str, context: str) -> None:
        raise ValueError(f"duplicate {context} key {key!r}")

    try:
        parsed = http_sf.parse(
            value.encode("ascii"), tltype="dictionary", on_duplicate_key=refuse_duplicate
        )
    # Hostile input reaches a third-party parser here: whatever it raises is a bad header.
    except Exception as exc:
        raise SignatureError(f"malformed {name}: {exc}") from exc
    assert isinstance(parsed, dict)
    return parsed


# --- signing ------------------------------------------------------------------------------------


def sign_request(
    identity: NodeIdentity,
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: int | None = None,
    ttl: int = 60,
    nonce: str | None = None,
) -> dict[str, str]:
    """The headers to add to a request so that its receiver can verify it came from `identity`:
    `content-digest`, `signature-input` and `signature`. `headers` must carry an
    `aihub-request-id`; raises ValueError if it does not, or if the request cannot be signed."""
    if ttl <= 0:
        raise ValueError("ttl must be positive")
    created = int(time.time()) if now is None else now
    fields = field_values(headers)
    if not fields.get(REQUEST_ID_HEADER):
        raise ValueError(f"a signed request needs an {REQUEST_ID_HEADER} header")
    digest = content_digest(body)
    fields["content-digest"] = digest
    params: dict[str, int | str] = {
        "created": created,
        "expires": created + ttl,
        "nonce": random_urlsafe(16) if nonce is None else nonce,
        "keyid": identity.node_id,
        "alg": ALG,
    }
    params_text = serialize_params(COVERED_COMPONENTS, params)
    base = signature_base(covered_components(method, url, fields, COVERED_COMPONENTS), params_text)
    return {
        "content-digest": digest,
        "signature-input": f"{LABEL}={params_text}",
        # An RFC 8941 dictionary of one byte sequence: its serialisation, written out.
        "signature": f"{LABEL}=:{base64.b64encode(identity.sign(base)).decode('ascii')}:",
    }


# --- verifying ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifiedSignature:
    """A signature that verifies: who made it, its nonce, and the last second at which it
    could still be accepted (`expires` plus the allowed skew), until which the nonce must be
    refused."""

    keyid: str
    nonce: str
    keep_until: int


def verify_request(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    public_key_for: Callable[[str], bytes | None],
    nonces: NonceCache,
    now: int | None = None,
    max_ttl: int = 300,
    skew: int = 300,
) -> str:
    """The keyid (node id) that signed this request; raises SignatureError otherwise.

    `public_key_for(keyid)` returns the signer's 32-byte Ed25519 public key, or None if that
    signer is not accepted here. The nonce is remembered only once the signature verifies, so
    forged requests cannot fill `nonces`. `nonces` is one process's memory: a node refuses
    replays across restarts and processes with a durable record of `check_request`'s answer.
    """
    now = int(time.time()) if now is None else now
    signed = check_request(
        method,
        url,
        headers,
        body,
        public_key_for=public_key_for,
        now=now,
        max_ttl=max_ttl,
        skew=skew,
    )
    remember_nonce(nonces, signed, now)
    return signed.keyid


def remember_nonce(nonces: NonceCache, signed: VerifiedSignature, now: int) -> None:
    """Refuse `signed` if `nonces` has seen its nonce; else remember it while it is valid."""
    try:
        fresh = nonces.remember(signed.keyid, signed.nonce, signed.keep_until, now)
    except NonceCacheFull as exc:
        raise SignatureBusy(f"cannot accept the request now: {exc}") from exc
    if not fresh:
        raise SignatureError("replay: this nonce was already used")


def check_request(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    public_key_for: Callable[[str], bytes | None],
    now: int,
    max_ttl: int = 300,
    skew: int = 300,
) -> VerifiedSignature:
    """`verify_request` without the replay check: the signature, its window, the digest."""
    fields = field_values(headers)
    signature = parse_signature(fields, LABEL)

    if sorted(signature.components) != sorted(COVERED_COMPONENTS):
        wanted, got = " ".join(COVERED_COMPONENTS), " ".join(signature.components)
        raise SignatureError(f"the signature must cover exactly {wanted}, not ({got})")
    params = signature.params
    unknown = set(params) - _ALLOWED_PARAMS
    if unknown:
        raise SignatureError(f"unsupported signature parameters: {', '.join(sorted(unknown))}")
    if "alg" in params and params["alg"] != ALG:
        raise SignatureError(f"unsupported signature algorithm {params['alg']!r}")
    created = _int_param(params, "created")
    expires = _int_param(params, "expires")
    nonce = _str_param(params, "nonce")
    keyid = _str_param(params, "keyid")
    if not _NONCE_MIN <= len(nonce) <= _NONCE_MAX:
        raise SignatureError(f"nonce must be {_NONCE_MIN} to {_NONCE_MAX} characters")

    if created > now + skew:
        raise SignatureError("signature created in the future")
    if expires <= created:
        raise SignatureError("signature expires before it is created")
    # The same allowance for clocks both ways (DESIGN: skew up to 5 min): a sender whose clock
    # is slow must not see every short-lived signature refused as expired.
    if expires + skew < now:
        raise SignatureError("signature expired")
    if expires - created > max_ttl:
        raise SignatureError(f"signature valid for longer than {max_ttl} seconds")

    _check_digest(fields.get("content-digest"), body)

    public_key = public_key_for(keyid)
    if public_key is None:
        raise SignatureError(f"unknown signer {keyid}")
    try:
        components = covered_components(method, url, fields, signature.components)
        base = signature_base(components, signature.params_text)
    except ValueError as exc:
        raise SignatureError(str(exc)) from exc
    if len(signature.signature) != _ED25519_SIGNATURE_BYTES:
        raise SignatureError("signature is not an Ed25519 signature")
    try:
        verify_key = nacl.signing.VerifyKey(public_key)
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
        raise SignatureError(f"the public key of {keyid} is not an Ed25519 key") from exc
    try:
        verify_key.verify(base, signature.signature)
    except nacl.exceptions.BadSignatureError as exc:
        raise SignatureError("signature does not verify") from exc

    # Refused as long as the signature could still be accepted, skew included.
    return VerifiedSignature(keyid, nonce, expires + skew)


def _int_param(params: Mapping[str, Any], name: str) -> int:
    value = params.get(name)
    if type(value) is not int:  # not bool, which is an int in Python
        raise SignatureError(f"signature parameter {name} missing or not an integer")
    return value


def _str_param(params: Mapping[str, Any], name: str) -> str:
    value = params.get(name)
    if type(value) is not str or not value:
        raise SignatureError(f"signature parameter {name} missing or not a string")
    return value


def _check_digest(header: str | None, body: bytes) -> None:
    if header is None:
        raise SignatureError("missing header content-digest")
    ours = _OUR_DIGEST.fullmatch(header)
    if ours is not None:
        # Our signers' form, read without the general parser (which cost as much as the rest
        # of the check): one sha-256 member, canonical base64, nothing else.
        digest = base64.b64decode(ours[1], validate=True)
        if not hmac.compare_digest(digest, hashlib.sha256(body).digest()):
            raise SignatureError("content-digest does not match the body")
        return
    try:
        digests = http_sf.parse(header.encode("ascii"), tltype="dictionary")
    except Exception as exc:  # hostile input, third-party parser: see _parse_dictionary
        raise SignatureError(f"malformed content-digest: {exc}") from exc
    assert isinstance(digests, dict)
    member = digests.get("sha-256")
    if not (isinstance(member, tuple) and type(member[0]) is bytes):
        raise SignatureError("content-digest has no sha-256 byte sequence")
    if not hmac.compare_digest(member[0], hashlib.sha256(body).digest()):
        raise SignatureError("content-digest does not match the body")
