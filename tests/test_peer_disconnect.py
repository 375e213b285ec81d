"""No answer without its receipt: a peer that goes away at the worst moment (a stream after its
last content chunk, before the usage chunk and the receipt event; a plain request while the
provider is still answering it) has its receipt written for what the provider produced, and
its cap charged for it. The peer here is an attacker: a script with a key pair of its own that
joined through an invite and speaks the wire protocol, not a node."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest

from federation.descriptors import make_descriptor
from federation.httpsig import REQUEST_ID_HEADER, sign_request
from federation.identity import NodeIdentity
from federation.ids import new_request_id
from federation.invites import make_join_request, parse_invite
from federation.sealing import unseal
from node.config import DATABASE_FILE
from node.peers.peering import JoinResponse, signed_request
from tests.hangup import post_then_hang_up
from tests.mocks.openai_mock import OpenAIMock
from tests.mocks.server import serve_app
from tests.test_federation import Peer, invite, make_peer, wait_for

HI = [{"role": "user", "content": "one two three"}]
WORDS = 5  # the mock answers "mock says: one two three"


class Attacker:
    """A key pair of its own, and the cross-node key an invite gave it."""

    def __init__(self, provider_url: str, token: str) -> None:
        self.identity = NodeIdentity.generate()
        self.url = provider_url
        self.key = asyncio.run(self._join(token))

    async def _join(self, token: str) -> str:
        invitation = parse_invite(token)
        descriptor = make_descriptor(self.identity, "mallory", ["http://127.0.0.1:9"])
        body = msgspec.json.encode(make_join_request(invitation, self.identity, descriptor))
        async with httpx.AsyncClient() as client:
            response = await signed_request(
                client, self.identity, "POST", self.url + "/federation/join", None, body
            )
        assert response.status_code == 200, response.text
        joined = msgspec.json.decode(response.content, type=JoinResponse)
        return unseal(self.identity, joined.sealed_key).decode()

    def signed(self, body: bytes) -> tuple[str, dict[str, str]]:
        """Headers of one signed peer request, and the request id it names its receipt by."""
        request_id = new_request_id()
        headers = {
            "authorization": f"Bearer {self.key}",
            "content-type": "application/json",
            REQUEST_ID_HEADER: request_id,
        }
        url = self.url + "/v1/chat/completions"
        headers.update(sign_request(self.identity, "POST", url, headers, body))
        return request_id, headers


@pytest.fixture
def upstream() -> Iterator[OpenAIMock]:
    mock = OpenAIMock(api_key=None)
    with serve_app(mock) as url:
        mock.url = url  # type: ignore[attr-defined]
        yield mock


@pytest.fixture
def provider(tmp_path: Path, upstream: OpenAIMock) -> Peer:
    return make_peer(
        tmp_path,
        "alice",
        '[[models]]\nname = "gpt-mock"\nprovider = "openai"\nmodel = "m"\n'
        f'base_url = "{upstream.url}/v1"\n'  # type: ignore[attr-defined]
        "price_in = 1_000_000\nprice_out = 1_000_000",
    )


def _receipt(provider: Peer, request_id: str) -> dict | None:
    with sqlite3.connect(provider.path / DATABASE_FILE) as db:
        row = db.execute("SELECT body FROM receipts WHERE id = ?", (request_id,)).fetchone()
    return msgspec.json.decode(row[0]) if row else None


def _receipt_in_time(provider: Peer, request_id: str, seconds: float = 15.0) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        receipt = _receipt(provider, request_id)
        if receipt is not None:
            return receipt
        time.sleep(0.05)
    raise AssertionError(f"no receipt for {request_id}: the answer went out unbilled")


def _spent(provider: Peer, consumer: str) -> int:
    """What the attacker's cross-node key has spent at the provider."""
    with sqlite3.connect(provider.path / DATABASE_FILE) as db:
        (key_id,) = db.execute("SELECT id FROM keys WHERE peer_id = ?", (consumer,)).fetchone()
        (spent,) = db.execute(
            "SELECT COALESCE(SUM(spent), 0) FROM spend WHERE scope = ?", (f"key:{key_id}",)
        ).fetchone()
    return spent


def _charged(provider: Peer, consumer: str, expected: int) -> int:
    """What the attacker's key has spent once `expected` is (or the deadline passed): its
    usage record is journaled with the answer and settles the spend with the next batch."""
    wait_for(lambda: _spent(provider, consumer) == expected)
    return _spent(provider, consumer)


def test_a_peer_that_drops_a_stream_before_its_receipt_is_still_billed(provider, upstream):
    # Each chunk a while after the last: the attacker is gone before the usage chunk comes.
    upstream.script.chunk_delay = 0.5
    with provider.run() as node:
        attacker = Attacker(node.url, invite(provider, "--cap", "1"))
        body = msgspec.json.encode({"model": "gpt-mock", "messages": HI, "stream": True})
        request_id, headers = attacker.signed(body)
        content = 0
        with httpx.Client(timeout=30) as client:
            url = node.url + "/v1/chat/completions"
            with client.stream("POST", url, content=body, headers=headers) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    choices = msgspec.json.decode(line[6:])["choices"]
                    content += sum(1 for c in choices if c["delta"].get("content"))
                    if any(c.get("finish_reason") for c in choices):
                        break  # the whole answer is here: drop before usage and receipt
        assert content == WORDS
        receipt = _receipt_in_time(provider, request_id)
        assert receipt["consumer"] == attacker.identity.node_id
        assert receipt["tokens_out"] >= WORDS and receipt["tokens_in"] > 0
        assert receipt["amount"] > 0
        assert _charged(provider, attacker.identity.node_id, receipt["amount"]) == receipt["amount"]


def test_a_peer_that_goes_away_from_a_plain_answer_is_still_billed(provider, upstream):
    upstream.script.delay = 1.0  # the provider is still answering when the attacker leaves
    with provider.run() as node:
        attacker = Attacker(node.url, invite(provider, "--cap", "1"))
        body = msgspec.json.encode({"model": "gpt-mock", "messages": HI})
        request_id, headers = attacker.signed(body)
        url = node.url + "/v1/chat/completions"
        post_then_hang_up(url, headers, body, lambda: len(upstream.script.received) == 1)
        receipt = _receipt_in_time(provider, request_id)
        assert receipt["tokens_out"] == WORDS  # the whole answer, produced and paid for
        assert (
            _charged(provider, attacker.identity.node_id, receipt["amount"])
            == receipt["amount"]
            > 0
        )
        assert upstream.script.cancelled == 0


def test_a_peer_that_leaves_while_its_stream_opens_is_settled(provider, upstream):
    upstream.script.delay = 1.0  # the stream opens after the attacker has gone
    with provider.run() as node:
        attacker = Attacker(node.url, invite(provider, "--cap", "1"))
        body = msgspec.json.encode({"model": "gpt-mock", "messages": HI, "stream": True})
        request_id, headers = attacker.signed(body)
        url = node.url + "/v1/chat/completions"
        post_then_hang_up(url, headers, body, lambda: len(upstream.script.received) == 1)
        receipt = _receipt_in_time(provider, request_id)
        assert (
            _charged(provider, attacker.identity.node_id, receipt["amount"])
            == receipt["amount"]
            > 0
        )
