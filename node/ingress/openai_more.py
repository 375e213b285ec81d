"""OpenAI's endpoints that only an OpenAI-compatible deployment serves: legacy text
completions (`POST /v1/completions`) and image generations (`POST /v1/images/generations`).

Each is decoded (only what routing and the worst case need: the rest passes through), run
through the one pipeline (`node/gateway/pipeline.py`) with its own kind, so keys, allowlists,
rate limits, budgets, usage and metrics apply as for chat, and answered with the upstream's
JSON byte for byte. The worst case reserved first: a completion's prompt at a token per byte
plus its output cap for each completion written (`max(n, best_of)`); images `n` at the
deployment's `price_per_image`. A completion may be streamed (`stream: true`: OpenAI's
`text_completion` chunks as the upstream sent them, the usage chunk for
`stream_options.include_usage`, then `[DONE]`, settled however the stream ends, as a chat
stream is); images are not (a `stream: true` is refused with a 400). Neither is offered to
peers: adverts carry chat and embeddings only.
"""

from __future__ import annotations

import msgspec
from litestar import Request

from adapters.openai import COMPLETION_DEFAULT_MAX_TOKENS
from adapters.types import (
    ChatStream,
    CompletionCall,
    CompletionRequest,
    CompletionStreamer,
    ImageCall,
    ImageRequest,
    Usage,
    WireResult,
    does_not_serve,
)
from federation.ids import new_request_id
from node.errors import HubError, Kind
from node.gateway import pipeline
from node.gateway.auth import Principal
from node.gateway.router import Route
from node.hub import hub_of
from node.ingress.asgi import (
    Reply,
    StreamReply,
    authenticate,
    caller_of,
    post_endpoint,
    read_body,
    watcher_of,
)
from node.ingress.openai import decode_body, item_renderer, response_headers
from node.observe import access

_completion_decoder = msgspec.json.Decoder(CompletionRequest)
_image_decoder = msgspec.json.Decoder(ImageRequest)


def completion_worst_case(request: CompletionRequest, plan: list[Route]) -> Usage:
    """The most a completion may use on this plan: its prompt at a token per byte, and the
    output cap (as the adapter sends it) for every completion the upstream writes."""
    prompt = len(msgspec.json.encode(request.prompt)) + 1
    ceiling = max(route.spec.max_output_tokens for route in plan)
    asked = COMPLETION_DEFAULT_MAX_TOKENS if request.max_tokens is None else request.max_tokens
    written = max(request.n, request.best_of or 1)
    output = min(asked, ceiling) * written
    return Usage(prompt, output, prompt + output)


def image_worst_case(request: ImageRequest) -> Usage:
    """Images are priced per image: `n` units out, nothing in."""
    return Usage(0, request.n, request.n)


def _refuse_stream(stream: bool) -> None:
    if stream:
        message = "Streaming is not offered on this endpoint: send `stream: false`"
        raise HubError(Kind.INVALID_REQUEST, message, param="stream", code="unsupported_value")


def _refuse_peer(principal: Principal) -> None:
    """Peers are charged the prices they were advertised, and these kinds are not."""
    if principal.key.peer_id is not None:
        message = "This endpoint is not offered to peers"
        raise HubError(Kind.FORBIDDEN, message, code="not_offered_to_peers")


def _reply(answer: pipeline.Answer) -> Reply:
    """The upstream's JSON as it came (only OpenAI-compatible adapters serve these kinds)."""
    assert isinstance(answer.result, WireResult)
    return Reply(answer.result.wire, response_headers(answer.facts))


async def _open_completion_stream(route: Route, call: CompletionCall) -> ChatStream:
    adapter = route.adapter
    if not isinstance(adapter, CompletionStreamer):  # the config lets no other adapter serve it
        raise does_not_serve(adapter.upstream.provider, "legacy text completions")
    return await adapter.open_completion_stream(call)


async def _completions(request: Request) -> Reply | StreamReply:
    principal = await authenticate(request)  # a bad key is told so before a bad body
    _refuse_peer(principal)
    body, raw = decode_body(await read_body(request, principal), _completion_decoder)
    call = CompletionCall(body, raw, new_request_id())
    access.note(request.scope, model=body.model)
    admitted = await pipeline.begin(
        hub_of(request),
        caller_of(request, principal),
        body.model,
        "completions",
        call.request_id,
        lambda plan: completion_worst_case(body, plan),
    )
    if body.stream:
        streamed = await pipeline.stream(
            admitted,
            call,
            watcher_of(request),
            lambda route: _open_completion_stream(route, call),
        )
        headers = {**response_headers(streamed.facts), "cache-control": "no-cache"}
        return StreamReply(streamed.items, headers, item_renderer(), streamed.abandon)
    answer = await pipeline.complete(
        admitted, lambda route: route.adapter.complete(call), watcher_of(request), call
    )
    return _reply(answer)


async def _images(request: Request) -> Reply:
    principal = await authenticate(request)
    _refuse_peer(principal)
    body, raw = decode_body(await read_body(request, principal), _image_decoder)
    _refuse_stream(body.stream)
    call = ImageCall(body, raw, new_request_id())
    access.note(request.scope, model=body.model)
    admitted = await pipeline.begin(
        hub_of(request),
        caller_of(request, principal),
        body.model,
        "images",
        call.request_id,
        lambda _: image_worst_case(body),
    )
    answer = await pipeline.complete(
        admitted, lambda route: route.adapter.images(call), watcher_of(request)
    )
    return _reply(answer)


completions = post_endpoint("/v1/completions", _completions)
image_generations = post_endpoint("/v1/images/generations", _images)

ROUTES = [completions, image_generations]
