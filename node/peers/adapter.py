"""The adapter of a route to a model another node shares with us.

A peer speaks the same OpenAI-compatible API as any upstream, so this is the OpenAI adapter
with the peer protocol's headers (`federation.transport`): each call carries the cross-node key
the peer issued us, is signed with our node key and marked one hop old, and the peer's signed
receipt is read from its answer. Its answers are the OpenAI adapter's too: the peer's bytes as
they came (`ChatResult.wire`, a stream's `OpenAIChunk`s), decoded only for a client of another
API, and never its receipt event. It lives in the node because it joins the two: the adapters
import nothing of ours, and federation imports no adapter.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec

from adapters.events import OpenAIChunk
from adapters.http import UpstreamClient
from adapters.openai import OpenAIAdapter, OpenAIStream
from adapters.types import (
    ChatCall,
    ChatResult,
    EmbedCall,
    EmbedResult,
    Upstream,
    UpstreamError,
    Usage,
    sse_event,
)
from federation.identity import NodeIdentity
from federation.transport import RECEIPT_EVENT, RECEIPT_HEADER, peer_call_headers
from node.config import UpstreamSection


def peer_upstream(
    model: str,
    url: str,
    key: str,
    limits: UpstreamSection | None = None,
    max_output_tokens: int = 4096,
) -> Upstream:
    """A peer as an upstream, under the node's `[upstream]` timeouts and size limits: a peer
    is as untrusted as any provider."""
    limits = limits or UpstreamSection()
    return Upstream(
        provider="peer",
        model=model,
        base_url=url.rstrip("/") + "/v1",
        api_key=key,
        max_output_tokens=max_output_tokens,
        connect_timeout=limits.connect_timeout,
        read_timeout=limits.read_timeout,
        max_response_bytes=limits.max_response_bytes,
        max_event_bytes=limits.max_event_bytes,
    )


_object = msgspec.json.Decoder(dict[str, msgspec.Raw])


def with_id(data: bytes, request_id: str) -> bytes:
    """A chat completion (or chunk) from a peer with our request id as its `id`, every other
    field as the peer sent it; what is not a JSON object with an id is left alone (the
    OpenAI adapter has checked it already)."""
    try:
        fields = _object.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return data
    if "id" not in fields:
        return data
    fields["id"] = msgspec.Raw(msgspec.json.encode(request_id))
    return msgspec.json.encode(fields)


class PeerStream:
    """A peer's stream, its chunks carrying our request id (as `with_id`), its failures the
    peer's name (`named_failure`)."""

    def __init__(self, inner: OpenAIStream, request_id: str, peer_name: str) -> None:
        self._inner = inner
        self._id = request_id
        self._peer = peer_name

    @property
    def usage(self) -> Usage | None:
        return self._inner.usage

    @property
    def usage_estimated(self) -> bool:
        return self._inner.usage_estimated

    @property
    def receipt(self) -> bytes | None:
        return self._inner.receipt

    async def __aiter__(self) -> AsyncIterator[OpenAIChunk]:
        try:
            async for chunk in self._inner:
                yield OpenAIChunk(sse_event(with_id(chunk.sse[6:-2], self._id)))
        except UpstreamError as exc:  # mid-stream: named, as before its first event
            raise named_failure(exc, self._peer) from exc

    async def aclose(self) -> None:
        await self._inner.aclose()


# The codes a peer refuses with that no retry changes: its cap for us is used up (or the
# request is over what is left of it).
CAP_CODES = ("insufficient_quota",)
# What an upstream error's message says after "peer upstream answered N: ", and the class
# of a connection failure: kept; the rest names the peer's address, which is not shown.
_ANSWERED = re.compile(r"^peer upstream answered \d+: ?")
_FAILURE_CLASS = re.compile(r"\(([A-Za-z_][A-Za-z0-9_.]*)")


class PeerAdapter(OpenAIAdapter):
    """The OpenAI adapter towards a peer; its errors name the peer by its name (never its
    address), a refusal of its cap is not retried, and a refusal of our key is checked with
    the peer (`confirm_revoked`): a peer that revoked us is reported as `peer_revoked`."""

    receipt_header = RECEIPT_HEADER
    receipt_event = RECEIPT_EVENT

    def __init__(
        self,
        upstream: Upstream,
        client: UpstreamClient,
        identity: NodeIdentity,
        peer_name: str = "peer",
        confirm_revoked: Callable[[], Awaitable[bool]] | None = None,
        answered: Callable[[], None] | None = None,
        unreachable: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(upstream, client)
        self.identity = identity
        self.peer_name = peer_name
        self.confirm_revoked = confirm_revoked
        # Told of each answer: a peer that answers is up, whatever its last health check said.
        self.answered = answered or (lambda: None)
        # Told when the peer could not be reached: its health is checked at once, not at the
        # next interval, so that it is shown (and known) down within a second.
        self.unreachable = unreachable or (lambda: None)

    async def chat(self, call: ChatCall) -> ChatResult:
        marked = _elastic.set(_output_elastic(call))
        try:
            result = await super().chat(call)
        except UpstreamError as exc:
            raise await self.peer_error(exc) from exc
        finally:
            _elastic.reset(marked)
        self.answered()
        if result.wire is None:
            return result
        # The answer's id is ours (the client's `aihub-request-id`), not the peer's own.
        return msgspec.structs.replace(result, wire=with_id(result.wire, call.request_id))

    async def open_stream(self, call: ChatCall) -> PeerStream:
        marked = _elastic.set(_output_elastic(call))
        try:
            stream = await super().open_stream(call)
        except UpstreamError as exc:
            raise await self.peer_error(exc) from exc
        finally:
            _elastic.reset(marked)
        self.answered()
        return PeerStream(stream, call.request_id, self.peer_name)

    async def embed(self, call: EmbedCall) -> EmbedResult:
        try:
            result = await super().embed(call)
        except UpstreamError as exc:
            raise await self.peer_error(exc) from exc
        self.answered()
        return result

    async def peer_error(self, exc: UpstreamError) -> UpstreamError:
        """The error as this node's client should read it: about the peer, by its name; a
        refusal of our key checked with the peer first."""
        name = f"The peer `{self.peer_name}`"
        if exc.upstream_status in (401, 403):
            if self.confirm_revoked is not None and await self.confirm_revoked():
                return UpstreamError(
                    403,
                    f"{name} revoked this node's access",
                    type="permission_error",
                    code="peer_revoked",
                )
            said = _ANSWERED.sub("", exc.message)[:300]
            if exc.upstream_status == 403:  # the key is good; this request is not allowed
                return _renamed(exc, f"{name} refused the request (403): {said}")
            # Unconfirmed: whatever code it sent, this node's key was refused, not revoked.
            refused = f"{name} refused this node's key (401): {said}"
            return _renamed(exc, refused, code="peer_refused_key")
        if exc.type == "upstream_unreachable":
            self.unreachable()
        return named_failure(exc, self.peer_name)

    def request_headers(self, url: str, body: bytes, request_id: str) -> dict[str, str]:
        key = self.upstream.api_key
        return peer_call_headers(self.identity, url, body, key, request_id, elastic=_elastic.get())


# Whether the chat call being sent (in this task) may be capped lower by the peer: the
# OpenAI adapter builds the request's headers without the call, and one adapter serves many
# requests at once, so the call's mark rides in a context variable, not on the adapter.
_elastic: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "peer_output_elastic", default=False
)


def _output_elastic(call: ChatCall) -> bool:
    """The client set no output limit (and this node did not cap it: then the raw fields
    hold none either, `pipeline.begin_chat`): the `max_tokens` sent is ours to bound the
    answer, and the peer may lower it rather than refuse a request its cap cannot fully
    cover."""
    return "max_tokens" not in call.raw and "max_completion_tokens" not in call.raw


def named_failure(exc: UpstreamError, peer_name: str) -> UpstreamError:
    """A peer's failure (other than a refused key) by the peer's name, never its address;
    a used-up cap marked as no retry can change it."""
    name = f"The peer `{peer_name}`"
    said = _ANSWERED.sub("", exc.message)[:300] if exc.upstream_status else ""
    if exc.upstream_status == 429 and exc.code in CAP_CODES:
        # Its cap for this node: used up until its period ends, whoever retries.
        return UpstreamError(
            429,
            f"{name} refused: this node's spend cap there is used up ({said})",
            type="insufficient_quota",
            code="peer_cap_exceeded",
            retryable=False,
            upstream_status=429,
        )
    if exc.upstream_status:
        return _renamed(exc, f"{name} answered {exc.upstream_status}: {said}")
    if exc.type == "upstream_unreachable":
        failure = _FAILURE_CLASS.search(exc.message)
        why = f" ({failure.group(1)})" if failure else ""
        return _renamed(exc, f"{name} could not be reached{why}")
    return _renamed(exc, exc.message.replace("peer upstream", name, 1))


def _renamed(exc: UpstreamError, message: str, code: str | None = None) -> UpstreamError:
    return UpstreamError(
        exc.status,
        message,
        type=exc.type,
        code=code or exc.code,
        retryable=exc.retryable,
        retry_after=exc.retry_after,
        upstream_status=exc.upstream_status,
    )
