"""The OpenAI-compatible endpoints: chat completions, embeddings and the model list.

Only OpenAI's surface lives here: decode a chat or embeddings body into the adapters' call,
hand it to the request pipeline (`node/gateway/pipeline.py`: admission, routing, the upstream
call, settlement, receipts), and render what comes back in OpenAI's format: the body, the
`aihub-*` headers, the SSE stream with its `aihub.receipt` event and closing `data: [DONE]`,
and errors as OpenAI errors (in the stream too). The bare ASGI endpoints they run on are
`node/ingress/asgi.py`'s.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
from litestar import Request, Response, get
from litestar.openapi.spec import (
    OpenAPI,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    PathItem,
    RequestBody,
    Schema,
)
from litestar.params import FromPath

from adapters.types import (
    ChatCall,
    ChatRequest,
    ChatResult,
    EmbedCall,
    EmbeddingRequest,
    EmbedResult,
    Usage,
    sse_event,
)
from federation.ids import new_request_id
from federation.transport import (
    RECEIPT_EVENT,
    RECEIPT_HEADER,
    SERVED_BY_HEADER,
    served_by_value,
)
from ledger.canonical import b64url
from ledger.nesting import bounded
from node.errors import HubError, Kind, UpstreamFailed
from node.gateway import pipeline
from node.gateway.auth import Principal
from node.gateway.pipeline import (
    Facts,
    ReceiptIssued,
    Signal,
    StreamEnd,
    StreamFailed,
    may_use,
)
from node.gateway.policy import worst_case_embedding_tokens
from node.hub import Hub, hub_of
from node.ingress.asgi import (
    JSON,
    OUTPUT_CAP_HEADER,
    Reply,
    StreamReply,
    authenticate,
    begin_chat,
    caller_of,
    local_only,
    post_endpoint,
    read_body,
    watcher_of,
)
from node.ingress.cache import CACHE_HEADER, cache_bypass
from node.ingress.errors import ApiError, ErrorDetail, error_bytes, openai_error
from node.ingress.openai_render import ChunkRenderer, result_body
from node.observe import access
from node.peers.auth import check_peer

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"

_raw_fields = msgspec.json.Decoder(dict[str, msgspec.Raw])
_chat_decoder = msgspec.json.Decoder(ChatRequest)
_embed_decoder = msgspec.json.Decoder(EmbeddingRequest)


class ModelCard(msgspec.Struct, tag_field="object", tag="model"):
    id: str
    owned_by: str
    created: int


class ModelList(msgspec.Struct, tag_field="object", tag="list"):
    data: list[ModelCard]


def _param(message: str) -> tuple[str, str | None]:
    """msgspec's `… - at `$.messages[0].role`` -> ("…", "messages[0].role")."""
    match = re.search(r" - at `\$\.?([^`]*)`$", message)
    if not match:
        return message, None
    return message[: match.start()], match.group(1) or None


def decode_body(body: bytes, decoder: msgspec.json.Decoder[T]) -> tuple[T, dict[str, Any]]:
    if not body:
        raise ApiError(400, "The request body is empty: send a JSON object")
    try:
        typed = decoder.decode(bounded(body))
        raw = _raw_fields.decode(body)
    except msgspec.ValidationError as exc:
        message, param = _param(str(exc))
        raise ApiError(400, f"Invalid request: {message}", param=param) from exc
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}") from exc
    return typed, raw


# --- rendering: what the pipeline hands back, in OpenAI's format ---------------------------


def _render_result(result: ChatResult | EmbedResult) -> bytes:
    """A complete answer's body: an OpenAI-compatible upstream's as it came, else encoded."""
    return result_body(result)


def _stream_error(error: HubError) -> ErrorDetail:
    """A failure mid-stream, as the error event tells it: what the upstream said, as it said
    it, or the gateway's own failure."""
    if isinstance(error, UpstreamFailed):
        upstream = error.upstream
        return ErrorDetail(upstream.message, upstream.type, upstream.code)
    return openai_error(error).detail


def _render_signal(signal: Signal) -> bytes:
    if isinstance(signal, StreamEnd):
        return DONE
    if isinstance(signal, ReceiptIssued):
        # Before [DONE], as an event of its own that the consuming node keeps.
        return b"event: " + RECEIPT_EVENT + b"\ndata: " + signal.receipt + b"\n\n"
    assert isinstance(signal, StreamFailed)
    return sse_event(error_bytes(_stream_error(signal.error)))


def item_renderer() -> Callable[[Any], bytes]:
    """How one stream's items are rendered: the adapter's events as OpenAI chunks (an
    OpenAI-compatible upstream's as they came), the pipeline's signals as OpenAI's events."""
    render_event = ChunkRenderer().render

    def render(item: Any) -> bytes:
        if isinstance(item, Signal):
            return _render_signal(item)
        return render_event(item)

    return render


def response_headers(facts: Facts) -> dict[str, str]:
    headers = {"aihub-request-id": facts.request_id, **facts.limits}
    if facts.cost_micros is not None:
        headers["aihub-cost-micros"] = str(facts.cost_micros)
    if facts.receipt is not None:
        headers[RECEIPT_HEADER] = b64url(facts.receipt)
    if facts.served_by is not None:
        headers[SERVED_BY_HEADER] = served_by_value(facts.served_by)
    if facts.output_cap is not None:
        headers[OUTPUT_CAP_HEADER] = str(facts.output_cap)
    if facts.cache is not None:
        headers[CACHE_HEADER] = facts.cache
    return headers


# --- the endpoints -------------------------------------------------------------------------


async def _chat(request: Request) -> Reply | StreamReply:
    principal = await authenticate(request)  # a bad key is told so before a bad body
    body = await read_body(request, principal)
    chat, raw = decode_body(body, _chat_decoder)
    bypass = cache_bypass(request, raw)
    call = ChatCall(chat, raw, new_request_id())
    hub = hub_of(request)
    slot = hub.cache.slot(principal, "openai.chat", call, raw, bypass)
    admitted = await begin_chat(request, principal, call, slot)
    admitted.books.log = hub.logs.draft(principal, body)
    if chat.stream:
        streamed = await pipeline.stream(admitted, call, watcher_of(request), cache=slot)
        headers = {**response_headers(streamed.facts), "cache-control": "no-cache"}
        return StreamReply(streamed.items, headers, item_renderer(), streamed.abandon)
    answer = await pipeline.complete(
        admitted, lambda route: route.adapter.chat(call), watcher_of(request), call, slot
    )
    return Reply(_render_result(answer.result), response_headers(answer.facts))


async def _embeddings(request: Request) -> Reply:
    principal = await authenticate(request)
    embed, raw = decode_body(await read_body(request, principal), _embed_decoder)
    call = EmbedCall(embed, raw, new_request_id())
    access.note(request.scope, model=embed.model)
    tokens = worst_case_embedding_tokens(embed)
    admitted = await pipeline.begin(
        hub_of(request),
        caller_of(request, principal),
        embed.model,
        "embeddings",
        call.request_id,
        lambda _: Usage(tokens, 0, tokens),
    )
    answer = await pipeline.complete(
        admitted, lambda route: route.adapter.embed(call), watcher_of(request)
    )
    return Reply(_render_result(answer.result), response_headers(answer.facts))


def _cards(hub: Hub, principal: Principal, local_only: bool) -> dict[str, ModelCard]:
    """The models this client can ask for: this node's own (owned by this node); then each
    peer's as `model@peer` (owned by that peer), and under its bare name where no model of
    this node shadows it (owned by the first peer that advertises it); only those its key's
    (and tenant's, or invite's) allowlist lets it use, as its advert shows a peer."""
    created = hub.started_at
    cards = {
        name: ModelCard(id=name, owned_by=hub.config.node.name, created=created)
        for name in hub.router.by_name
        if may_use(principal, name)
    }
    if local_only:
        return cards
    pinned: dict[str, ModelCard] = {}
    for name, routes in hub.router.peer_by_name.items():
        if not may_use(principal, name):
            continue
        for route in routes:
            owner = route.peer_name or "peer"
            cards.setdefault(name, ModelCard(id=name, owned_by=owner, created=created))
            label = f"{name}@{owner}"
            pinned.setdefault(label, ModelCard(id=label, owned_by=owner, created=created))
    return {**cards, **pinned}


async def _authenticate_listing(request: Request) -> Principal:
    """A model listing's caller: a cross-node key counts only with its peer's signature, as
    on every peer endpoint (a stolen key alone must not show what the peer may use)."""
    principal = await authenticate(request)
    await check_peer(hub_of(request), request, await request.body(), principal)
    return principal


@get("/v1/models")
async def list_models(request: Request) -> Response[bytes]:
    principal = await _authenticate_listing(request)
    cards = _cards(hub_of(request), principal, local_only(request, principal))
    return Response(msgspec.json.encode(ModelList(list(cards.values()))), media_type=JSON)


@get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: FromPath[str]) -> Response[bytes]:
    principal = await _authenticate_listing(request)
    model = model_id.lstrip("/")
    card = _cards(hub_of(request), principal, local_only(request, principal)).get(model)
    if card is None:
        message = f"The model `{model}` does not exist on this node"
        raise HubError(Kind.NOT_FOUND, message, param="model", code="model_not_found")
    return Response(msgspec.json.encode(card), media_type=JSON)


chat_completions = post_endpoint("/v1/chat/completions", _chat)
embeddings = post_endpoint("/v1/embeddings", _embeddings)


def document(openapi: OpenAPI) -> None:
    """Describe the ASGI endpoints in the app's OpenAPI schema (Litestar lists only the
    routes it answers itself). Their bodies are OpenAI's: its API reference is the spec."""
    body = {JSON: OpenAPIMediaType(schema=Schema(type=OpenAPIType.OBJECT))}
    paths = dict(openapi.paths or {})
    for path, operation_id, what in (
        ("/v1/chat/completions", "createChatCompletion", "a chat completion"),
        ("/v1/embeddings", "createEmbedding", "embeddings"),
        ("/v1/responses", "createResponse", "a response"),
    ):
        paths[path] = PathItem(
            post=Operation(
                operation_id=operation_id,
                summary=f"Create {what} (OpenAI-compatible)",
                request_body=RequestBody(content=body, required=True),
                responses={
                    "200": OpenAPIResponse(
                        description=f"{what[0].upper()}{what[1:]}, OpenAI's format",
                        content=body,
                    )
                },
            )
        )
    openapi.paths = paths


ROUTES = [chat_completions, embeddings, list_models, get_model]
