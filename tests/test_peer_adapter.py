"""The adapter of a route to a peer: signed, one hop old, and the peer's receipt read from its
answer (a header, or a stream event of its own); a plain OpenAI-compatible upstream's answer is
never read for one (the receipt names are the federation protocol's, not the adapters')."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pytest

from adapters.http import UpstreamClient
from adapters.openai import OpenAIAdapter
from adapters.types import Upstream, UpstreamError
from federation.httpsig import verify_request
from federation.identity import NodeIdentity
from federation.nonces import NonceCache
from federation.transport import HOP_HEADER, RECEIPT_EVENT, RECEIPT_HEADER
from node.config import UpstreamSection
from node.peers.adapter import PeerAdapter, peer_upstream
from tests.calls import chat_call, rendered
from tests.mocks.script import read_body
from tests.mocks.server import serve_app

RECEIPT = "cmVjZWlwdA"  # what the peer signed, as it travels (base64url)
COMPLETION = {
    "id": "c1",
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    "finish_reason": "stop",
    "usage": {"prompt_tokens": 3, "completion_tokens": 1},
}
CHUNK = {"id": "c1", "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}
USAGE_CHUNK = {"id": "c1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}


class ReceiptingPeer:
    """An upstream that answers every call as an aihub node answers a peer: with a receipt."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str], bytes]] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        body = await read_body(receive)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.received.append((scope["path"], headers, body))
        if msgspec.json.decode(body).get("stream"):
            start = [(b"content-type", b"text/event-stream")]
            events = [
                b"data: " + msgspec.json.encode(CHUNK) + b"\n\n",
                b"data: " + msgspec.json.encode(USAGE_CHUNK) + b"\n\n",
                b"event: " + RECEIPT_EVENT + b"\ndata: " + RECEIPT.encode() + b"\n\n",
                b"data: [DONE]\n\n",
            ]
        else:
            start = [
                (b"content-type", b"application/json"),
                (RECEIPT_HEADER.encode(), RECEIPT.encode()),
            ]
            events = [msgspec.json.encode(COMPLETION)]
        await send({"type": "http.response.start", "status": 200, "headers": start})
        await send({"type": "http.response.body", "body": b"".join(events)})


@pytest.fixture(scope="module")
def peer() -> ReceiptingPeer:
    return ReceiptingPeer()


@pytest.fixture(scope="module")
def url(peer: ReceiptingPeer) -> Iterator[str]:
    with serve_app(peer) as url:
        yield url


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    async with UpstreamClient() as client:
        yield client


async def test_a_peer_call_is_signed_one_hop_old_and_its_receipt_kept(url, client, peer):
    me = NodeIdentity.generate()
    adapter = PeerAdapter(peer_upstream("m", url, "sk-peer"), client, me)

    result = await adapter.chat(chat_call())
    assert result.receipt == RECEIPT.encode()
    path, headers, body = peer.received[-1]
    assert path == "/v1/chat/completions"
    assert headers[HOP_HEADER] == "1"
    assert headers["authorization"] == "Bearer sk-peer"
    mine = bytes(me.verify_key)
    keyid = verify_request(
        "POST", url + path, headers, body, public_key_for=lambda _: mine, nonces=NonceCache()
    )
    assert keyid == me.node_id

    stream = await adapter.open_stream(chat_call(stream=True))
    events = await rendered(stream)
    assert stream.receipt == RECEIPT.encode()
    assert all(RECEIPT.encode() not in event for event in events)  # never passed on


async def test_a_plain_upstream_answer_is_not_read_for_a_receipt(url, client, peer):
    upstream = Upstream(provider="openai", model="m", base_url=url + "/v1", api_key="sk-x")
    result = await OpenAIAdapter(upstream, client).chat(chat_call())
    assert result.receipt is None
    _, headers, _ = peer.received[-1]
    assert HOP_HEADER not in headers and "signature" not in headers


async def _huge_answer(scope: dict, receive: Any, send: Any) -> None:
    """A peer answering a completion of 64 KB (with a receipt, as an honest one would)."""
    while (await receive()).get("more_body"):
        pass
    answer = {**COMPLETION, "choices": [{"index": 0, "message": {"content": "x" * 65536}}]}
    start = [(b"content-type", b"application/json"), (RECEIPT_HEADER.encode(), b"cmVjZWlwdA")]
    await send({"type": "http.response.start", "status": 200, "headers": start})
    await send({"type": "http.response.body", "body": msgspec.json.encode(answer)})


async def test_a_peer_answer_is_held_to_the_nodes_upstream_limits(client):
    """A peer is as untrusted as any provider: its answers get the node's `[upstream]` size
    limits and timeouts, not the built-in defaults."""
    limits = UpstreamSection(
        connect_timeout=2.0, read_timeout=30.0, max_response_bytes=4096, max_event_bytes=4096
    )
    upstream = peer_upstream("m", "http://127.0.0.1:9", "sk-peer", limits)
    assert (upstream.connect_timeout, upstream.read_timeout) == (2.0, 30.0)
    assert (upstream.max_response_bytes, upstream.max_event_bytes) == (4096, 4096)
    with serve_app(_huge_answer) as huge_url:
        upstream = peer_upstream("m", huge_url, "sk-peer", limits)
        adapter = PeerAdapter(upstream, client, NodeIdentity.generate())
        with pytest.raises(UpstreamError) as refused:
            await adapter.chat(chat_call())
    assert refused.value.code == "upstream_response_too_large"
