"""What a stranger, a peer or a client can send that must never cost a 500 or a traceback:
JSON nested deeper than any real body, on every endpoint that decodes JSON and in the answers
of a peer the node decodes."""

from __future__ import annotations

import httpx
import msgspec
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from federation.identity import NodeIdentity
from federation.invites import create_invite
from federation.transport import signed_headers
from ledger.nesting import MAX_NESTING, NestingError, bounded, deeper_than, nesting_depth
from ledger.records import RecordError, decode_fields
from node.cli.main import main
from tests.conftest import NodeDir, run_node
from tests.mocks.server import free_port, serve_app
from tests.test_fuzz import assert_openai_error

# The example: 2 KB of brackets.
DEEP = b"[" * 1000 + b"]" * 1000


def deep_object(depth: int) -> bytes:
    return b'{"model": "echo", "messages": ' + b"[" * depth + b"]" * depth + b"}"


def test_nesting_depth_counts_brackets_outside_strings_only() -> None:
    assert nesting_depth(b'{"a": [1, {"b": "[[[[{{"}]}') == 3
    assert nesting_depth(b'["\\\\", "\\"[[[", []]') == 2
    assert nesting_depth(b"7") == 0
    assert bounded(b"[" * MAX_NESTING + b"]" * MAX_NESTING)
    with pytest.raises(NestingError):
        bounded(b"[" * (MAX_NESTING + 1) + b"]" * (MAX_NESTING + 1))
    with pytest.raises(NestingError):
        bounded(DEEP.decode())


JSON_VALUES = st.recursive(
    st.none() | st.integers() | st.text(alphabet=st.sampled_from('ab"\\[]{}\n')),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=60,
)


def _depth(item: object) -> int:
    if isinstance(item, list):
        return 1 + max(map(_depth, item), default=0)
    if isinstance(item, dict):
        return 1 + max(map(_depth, item.values()), default=0)
    return 0


@given(JSON_VALUES, st.integers(0, 12))
def test_nesting_depth_agrees_with_the_decoded_value(value: object, limit: int) -> None:
    """Strings full of brackets, quotes and backslashes count for nothing; the fast test and
    the exact count agree on every well-formed body."""
    data = msgspec.json.encode(value)
    assert nesting_depth(data) == _depth(value)
    assert deeper_than(data, limit) == (_depth(value) > limit)


@given(
    st.binary(max_size=200) | st.text(alphabet=st.sampled_from('"\\[]{}x,:')).map(str.encode),
    st.integers(0, 8),
)
def test_the_fast_test_never_lets_deep_input_through(data: bytes, limit: int) -> None:
    """Malformed input may be counted deeper than it is (the decoder refuses it anyway),
    never shallower."""
    if nesting_depth(data) > limit:
        assert deeper_than(data, limit)


def test_a_deep_signed_record_is_a_record_error() -> None:
    with pytest.raises(RecordError):
        decode_fields(b'{"v": 1, "x": ' + DEEP + b"}")


def _federation_post(url: str, body: bytes) -> httpx.Response:
    # Signed by a fresh key pair: any stranger can sign a join or a join request.
    headers = signed_headers(NodeIdentity.generate(), "POST", url, body)
    return httpx.post(url, content=body, headers=headers, timeout=30)


def test_deep_json_is_a_400_on_every_json_endpoint(node_dir: NodeDir) -> None:
    node_dir.add_config('[[models]]\nname = "echo"\nprovider = "echo"')
    admin = {"authorization": f"Bearer {node_dir.key}"}
    with run_node(node_dir) as node:
        plain = [
            ("POST", "/v1/chat/completions"),
            ("POST", "/v1/embeddings"),
            ("POST", "/admin/keys"),
            ("PATCH", "/admin/keys/admin"),
            ("POST", "/admin/tenants"),
            ("POST", "/admin/ledger/net"),
        ]
        for method, path in plain:
            for body in (DEEP, deep_object(MAX_NESTING + 1)):
                answer = httpx.request(
                    method, node.url + path, content=body, headers=admin, timeout=30
                )
                assert answer.status_code == 400, (path, answer.status_code, answer.text[:200])
                assert "nested" in assert_openai_error(answer)["message"]
        federation = [
            "/federation/join",
            "/federation/join-request",
            "/federation/advert",
            "/federation/countersignatures",
            "/federation/receipts",
            "/federation/settlements",
        ]
        for path in federation:
            answer = _federation_post(node.url + path, DEEP)
            assert answer.status_code == 400, (path, answer.status_code, answer.text[:200])
            assert "nested" in assert_openai_error(answer)["message"]
        # Bodies that nest as deep as real ones still get through.
        ok = httpx.post(
            node.url + "/v1/chat/completions",
            json={"model": "echo", "messages": [{"role": "user", "content": "[[[[" * 100}]},
            headers=admin,
            timeout=30,
        )
        assert ok.status_code == 200, ok.text


def test_a_deep_answer_from_a_malicious_issuer_fails_the_join_cleanly(node_dir: NodeDir) -> None:
    """A node joining through an invite decodes the issuer's answer: an issuer that answers
    with 2 KB of brackets makes `aihub join` fail with a message, not a traceback."""
    mallory = NodeIdentity.generate()
    port = free_port()

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        answer = b'{"v": 1, "descriptor": {"a": ' + DEEP + b"}}"
        await send({"type": "http.response.body", "body": answer})

    token, _ = create_invite(mallory, [f"http://127.0.0.1:{port}"], [], None, "monthly", 1, 600)
    with serve_app(app, port=port):
        result = CliRunner().invoke(main, ["join", token, "--data-dir", str(node_dir.path)])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "not valid" in result.output


def test_bounded_takes_text_as_well_as_bytes() -> None:
    # A str (a header's or a file's text) is checked as its UTF-8 bytes.
    assert bounded('{"a": "\ud800"}') == '{"a": "\ud800"}'
