"""docs/protocol.md cannot drift from the code: each of its test vectors verifies with the
code's own verifiers, and docs/vectors.py still produces exactly the vectors it holds (a change
to the wire format fails here until the document is updated: `python docs/vectors.py`)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import msgspec
import nacl.signing
import pytest

from federation.adverts import verify_advert
from federation.descriptors import fingerprint, verify_descriptor
from federation.httpsig import SignatureError, check_request
from federation.identity import node_id_for
from federation.invites import InviteRecord, parse_invite, verify_join_request
from ledger.canonical import b64url, b64url_decode, canonical
from ledger.chain import verify_chain
from ledger.receipts import (
    parse_receipt,
    public_key_of,
    receipt_hash,
    verify_countersignature,
    verify_receipt,
)
from ledger.records import RecordError
from ledger.settlement import check_statement, parse_statement, verify_statement

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "protocol.md").read_text()
VECTOR = re.compile(r"<!-- vector: ([a-z-]+) -->\n```text\n(.*?)\n```", re.S)
NOW = 1_800_000_000


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("protocol_vectors", ROOT / "docs" / "vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def documented() -> dict[str, str]:
    found = VECTOR.findall(DOC)
    names = [name for name, _ in found]
    assert len(names) == len(set(names)), "a vector is in the document twice"
    return dict(found)


V = documented()


def labelled(name: str) -> dict[str, str]:
    """A `label: value` block as a dict (the label is the text before the first colon)."""
    return {
        label.strip(): value.strip()
        for label, value in (line.split(":", 1) for line in V[name].splitlines())
    }


def node_ids() -> tuple[str, str]:
    ids = labelled("identities")
    return ids["alice node id"], ids["bob node id"]


def test_the_generator_still_produces_exactly_the_documented_vectors() -> None:
    generated = _generator().vectors()
    assert list(V) == list(generated), "vectors added, removed or reordered"
    for name, text in generated.items():
        assert V[name] == text, f"vector {name!r} changed: run `python docs/vectors.py`"


def test_identities_are_the_keys_of_their_seeds() -> None:
    ids = labelled("identities")
    for who in ("alice", "bob"):
        key = nacl.signing.SigningKey(bytes.fromhex(ids[f"{who} seed (hex)"])).verify_key
        assert node_id_for(key) == ids[f"{who} node id"]
        assert fingerprint(ids[f"{who} node id"]) == ids[f"{who} fingerprint"]


def test_the_canonical_encoding_and_its_signature() -> None:
    block = labelled("canonical")
    encoded = canonical(msgspec.json.decode(block["input"]))
    assert encoded.decode() == block["canonical"]
    assert encoded.hex() == block["hex"]
    alice, _ = node_ids()
    nacl.signing.VerifyKey(public_key_of(alice)).verify(encoded, b64url_decode(block["alice sig"]))


def test_the_descriptor_verifies() -> None:
    alice, _ = node_ids()
    descriptor = verify_descriptor(V["descriptor"], pinned=alice, now=NOW)
    assert descriptor.name == "alice"


def test_the_invite_token_verifies_and_carries_the_documented_payload() -> None:
    alice, _ = node_ids()
    invite = parse_invite(V["invite-token"], now=NOW)
    assert invite.issuer == alice
    assert msgspec.json.decode(V["invite-payload"]) == msgspec.to_builtins(invite)
    seed = b64url_decode(invite.seed)
    public = bytes(nacl.signing.SigningKey(seed).verify_key)
    assert labelled("join-proof")["invite public key"] == b64url(public)


def test_the_join_request_verifies_against_the_invite() -> None:
    alice, bob = node_ids()
    invite = parse_invite(V["invite-token"], now=NOW)
    proof = labelled("join-proof")
    record = InviteRecord(
        token_id=invite.token_id,
        invite_public_key=b64url_decode(proof["invite public key"]),
        exp=invite.exp,
        uses=invite.uses,
        models=invite.models,
        cap_micros=invite.cap_micros,
        cap_period=invite.cap_period,
    )
    joiner = verify_join_request(V["join-request"], record, alice, now=NOW + 30)
    assert joiner.node_id == bob
    fields = msgspec.json.decode(V["join-request"])
    assert proof["proof"] == fields["proof"]
    assert proof["proof message"].encode() == canonical(
        ["aihub-join/1", alice, bob, fields["nonce"], fields["iat"]]
    )
    # The proof names one issuer: the same request verifies for no other.
    with pytest.raises(RecordError):
        verify_join_request(V["join-request"], record, bob, now=NOW + 30)


def test_the_advert_verifies() -> None:
    alice, _ = node_ids()
    advert = verify_advert(V["advert"], pinned_node_id=alice, now=NOW)
    assert [m.id for m in advert.models] == ["llama3", "nomic-embed"]


def test_the_receipts_verify_countersign_and_chain() -> None:
    alice, bob = node_ids()
    sent = verify_receipt(V["receipt"], public_key_of(alice), consumer=bob, now=NOW)
    header = V["receipt-header"].removeprefix("aihub-receipt: ")
    assert b64url_decode(header) == V["receipt"].encode()
    both = verify_receipt(V["receipt-countersigned"], public_key_of(alice), consumer=bob, now=NOW)
    verify_countersignature(both, public_key_of(bob))
    assert msgspec.structs.replace(both, csig="") == sent
    documented_hash = V["receipt-hash"].rsplit(": ", 1)[1]
    assert receipt_hash(both) == receipt_hash(sent) == documented_hash
    nxt = verify_receipt(V["receipt-next"], public_key_of(alice), consumer=bob, now=NOW)
    assert nxt.prev == documented_hash
    report = verify_chain([both, nxt], public_key_of(alice), public_key_of(bob))
    assert report.ok, report


def test_the_statement_verifies_and_sums_the_receipts() -> None:
    alice, bob = node_ids()
    statement = parse_statement(V["statement"])
    assert (statement.a, statement.b) == tuple(sorted([alice, bob]))
    verify_statement(
        V["statement"], public_key_of(statement.a), public_key_of(statement.b), now=NOW + 120
    )
    chain = [parse_receipt(V["receipt-countersigned"]), parse_receipt(V["receipt-next"])]
    a_to_b = chain if statement.a == alice else []
    b_to_a = chain if statement.a == bob else []
    check_statement(statement, a_to_b, b_to_a, previous=None)


def _signed_request() -> tuple[str, str, dict[str, str], bytes]:
    head, body = V["signed-request"].split("\n\n", 1)
    request_line, *header_lines = head.splitlines()
    method, url = request_line.split(" ", 1)
    headers = dict(line.split(": ", 1) for line in header_lines)
    return method, url, headers, body.encode()


def test_the_signed_request_verifies() -> None:
    _, bob = node_ids()
    method, url, headers, body = _signed_request()

    def key_for(key_id: str) -> bytes | None:
        return public_key_of(bob) if key_id == bob else None

    signed = check_request(method, url, headers, body, public_key_for=key_for, now=NOW)
    assert signed.keyid == bob
    assert signed.keep_until == NOW + 60 + 300  # expires + the allowed skew
    # The documented base is the one signed: its last line is the Signature-Input member.
    base = V["signature-base"].splitlines()
    assert base[-1] == '"@signature-params": ' + headers["signature-input"].removeprefix("aihub=")


# Each signed vector with one character changed must be refused by its verifier: the checks
# above would pass as well for verifiers that accept anything.
def _tampered(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


def test_a_changed_vector_is_refused() -> None:
    alice, bob = node_ids()
    with pytest.raises(RecordError):
        verify_descriptor(_tampered(V["descriptor"], '"alice"', '"alicf"'), now=NOW)
    with pytest.raises(RecordError):
        verify_advert(_tampered(V["advert"], "750000", "750001"), pinned_node_id=alice, now=NOW)
    with pytest.raises(RecordError):
        verify_receipt(
            _tampered(V["receipt"], '"amount":20', '"amount":21'), public_key_of(alice), now=NOW
        )
    with pytest.raises(RecordError):
        verify_statement(
            _tampered(V["statement"], '"iat":1800000120', '"iat":1800000121'),
            public_key_of(min(alice, bob)),
            public_key_of(max(alice, bob)),
            now=NOW + 120,
        )
    method, url, headers, body = _signed_request()
    with pytest.raises(SignatureError):
        check_request(
            method,
            url.replace("/v1/chat/completions", "/v1/embeddings"),
            headers,
            body,
            public_key_for=lambda key_id: public_key_of(bob),
            now=NOW,
        )


# --- links: the documents stand alone ---------------------------------------------------------

LINKED = ["README.md", "docs/protocol.md", "docs/architecture.md", "docs/deploy.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but hyphens dropped, spaces as
    hyphens, a repeated anchor numbered."""
    seen: dict[str, int] = {}
    found = set()
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


@pytest.mark.parametrize("document", LINKED)
def test_every_link_stays_in_the_repository_and_resolves(document: str) -> None:
    path = ROOT / document
    text = path.read_text()
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.is_relative_to(ROOT), f"{document} links outside the repository: {target}"
        assert linked.exists(), f"{document} links a missing file: {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked.read_text()), f"{document}: no anchor {target}"


def test_the_readme_links_the_protocol_and_the_architecture() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "(docs/protocol.md)" in readme and "(docs/architecture.md)" in readme
