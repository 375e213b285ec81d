"""A signed link to one peer about our books: the requests, and the peer's answers read
bounded (in size and in time) and decoded or refused. Apart because every exchange with a
peer (reconciliation, re-sync, settlement) goes through it, and whatever the peer sends is
untrusted until it passes here."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import msgspec

from federation.descriptors import NodeDescriptor
from federation.identity import NodeIdentity
from federation.sealing import unseal
from ledger.nesting import bounded
from node.errors import Kind
from node.peers.books.errors import BooksError
from node.storage.base import Store
from node.storage.records import PeerRecord

if TYPE_CHECKING:
    import httpx


MAX_ANSWER = 8 * 1024 * 1024  # a page of 1000 receipts with countersignatures is ~1 MB
ANSWER_DEADLINE = 60.0  # seconds for one whole answer of a peer
# A peer's answers that mean "not shown to you" (not "try again"): an older node without the
# endpoint, or one that does not take our signature alone.
REFUSALS = (401, 403, 404)


T = TypeVar("T")


@dataclass
class Link:
    """What it takes to ask a peer about our books: its URL and the key it issued us."""

    identity: NodeIdentity
    client: httpx.AsyncClient
    peer: PeerRecord
    url: str
    key: str | None

    async def get(self, path: str) -> PeerAnswer:
        return await self._ask("GET", path)

    async def post(self, path: str, body: bytes) -> PeerAnswer:
        return await self._ask("POST", path, body)

    async def _ask(self, method: str, path: str, body: bytes = b"") -> PeerAnswer:
        """A signed request to the peer; its answer read up to `MAX_ANSWER` bytes (decoded)
        within `ANSWER_DEADLINE`: a peer that sends without end, or drips, is cut off."""
        # Imported here: `aihub ledger balance` reads the books without the peer transport
        # (request signatures parse URLs with httpx; peering brings aiohttp).
        from federation.transport import signed_headers
        from node.peers.peering import PEER_TIMEOUT

        url = self.url + path
        headers = signed_headers(self.identity, method, url, body, key=self.key)
        try:
            async with asyncio.timeout(ANSWER_DEADLINE):
                request = self.client.stream(
                    method, url, content=body, headers=headers, timeout=PEER_TIMEOUT
                )
                async with request as response:
                    return PeerAnswer(response.status_code, await _bounded(response))
        except TimeoutError as exc:
            raise BooksError(
                Kind.PEER_TIMEOUT, f"the peer took over {ANSWER_DEADLINE:.0f} s to answer"
            ) from exc


@dataclass(frozen=True)
class PeerAnswer:
    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        """The start of the answer, fit to print: the peer chose every byte of it."""
        text = self.content[:300].decode("utf-8", "replace")
        return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


async def _bounded(response: httpx.Response) -> bytes:
    announced = response.headers.get("content-length", "")
    if announced.isdigit() and int(announced) > MAX_ANSWER:
        raise BooksError(
            Kind.PEER_FAILURE, f"the peer's answer is too large (over {MAX_ANSWER} bytes)"
        )
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_ANSWER:
            raise BooksError(
                Kind.PEER_FAILURE, f"the peer's answer is too large (over {MAX_ANSWER} bytes)"
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def link_to(
    store: Store, identity: NodeIdentity, client: httpx.AsyncClient, peer: str
) -> Link:
    for record in await store.peers.peers(include_revoked=True):
        if peer in (record.node_id, record.name):
            descriptor = msgspec.json.decode(record.descriptor, type=NodeDescriptor)
            key = unseal(identity, record.key_from_them).decode() if record.key_from_them else None
            return Link(identity, client, record, descriptor.urls[0], key)
    raise BooksError(Kind.NOT_FOUND, f"no peer {peer!r}")


def answered(response: PeerAnswer, what: str) -> bytes:
    if response.status_code != 200:
        raise BooksError(
            Kind.PEER_FAILURE, f"the peer refused {what} ({response.status_code}): {response.text}"
        )
    return response.content


def decoded(data: bytes, kind: type[T]) -> T:
    try:
        return msgspec.json.decode(bounded(data), type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BooksError(Kind.PEER_FAILURE, f"the peer's answer is not valid: {exc}") from exc
