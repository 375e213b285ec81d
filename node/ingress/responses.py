"""The OpenAI Responses API endpoint: `POST /v1/responses`, plain and streamed.

Decode the body (`responses_wire`), translate it into the chat call every adapter takes
(`responses_chat`), after the conversation a `previous_response_id` names
(`responses_stored`), run it through the request pipeline as a chat request (admission,
routing, budgets, usage and receipts are the pipeline's, as for chat completions), render
what comes back as a `response` object or the Responses stream's typed events
(`responses_render`), and keep it for its key. A deployment whose upstream speaks the
Responses API (`responses = true`) is sent the request itself instead, its history expanded
by the node (`responses_native`), and its answer is passed on. Errors are OpenAI's, as on
every OpenAI surface.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import msgspec
from litestar import Request

from adapters.types import ChatResult
from federation.ids import new_request_id
from node.gateway import pipeline
from node.hub import hub_of
from node.ingress.asgi import (
    Reply,
    StreamReply,
    authenticate,
    begin_chat,
    post_endpoint,
    read_body,
    watcher_of,
)
from node.ingress.cache import cache_bypass
from node.ingress.openai import decode_body, response_headers
from node.ingress.responses_chat import chat_call, input_items
from node.ingress.responses_native import native_request, own_response
from node.ingress.responses_render import Shell, StreamRenderer, complete_response
from node.ingress.responses_stored import ROUTES as STORED_ROUTES
from node.ingress.responses_stored import earlier_items, keep
from node.ingress.responses_wire import ResponsesRequest

log = logging.getLogger("aihub.gateway")

_decoder = msgspec.json.Decoder(ResponsesRequest)


async def _responses(request: Request) -> Reply | StreamReply:
    principal = await authenticate(request)  # a bad key is told so before a bad body
    sent = await read_body(request, principal)
    body, raw = decode_body(sent, _decoder)
    bypass = cache_bypass(request, raw)
    hub = hub_of(request)
    earlier = await earlier_items(hub, principal, body.previous_response_id)
    inputs = input_items(body)
    native = any(
        route.adapter.upstream.responses for route in hub.router.by_name.get(body.model, ())
    )
    call = chat_call(body, earlier, inputs, new_request_id(), lenient=native)
    chat = call.request
    slot = hub.cache.slot(principal, "openai.responses", call, raw, bypass)
    admitted = await begin_chat(request, principal, call, slot)
    call.native = native_request(admitted.plan, raw, earlier, inputs)
    admitted.books.log = hub.logs.draft(principal, sent)
    shell = Shell.of(body, call.request_id)
    store = body.store is not False  # OpenAI's default: kept

    async def kept(response: bytes) -> None:
        if store:
            redaction = admitted.books.redaction
            await keep(hub, principal, shell.id, response, earlier, inputs, redaction)

    if chat.stream:
        streamed = await pipeline.stream(admitted, call, watcher_of(request), cache=slot)
        headers = {**response_headers(streamed.facts), "cache-control": "no-cache"}
        renderer = StreamRenderer(shell)
        items = _kept_at_end(streamed.items, renderer, kept)
        return StreamReply(items, headers, renderer.render, streamed.abandon)
    answer = await pipeline.complete(
        admitted, lambda route: route.adapter.chat(call), watcher_of(request), call, slot
    )
    assert isinstance(answer.result, ChatResult)
    if answer.result.native is not None:
        reply = own_response(answer.result.native, shell.id, body)
    else:
        reply = msgspec.json.encode(complete_response(shell, answer.result))
    await kept(reply)
    return Reply(reply, response_headers(answer.facts))


async def _kept_at_end(
    items: AsyncGenerator[Any, None],
    renderer: StreamRenderer,
    kept: Callable[[bytes], Awaitable[None]],
) -> AsyncGenerator[Any, None]:
    """The stream's items; once the last is rendered, the response is kept, before the body
    ends, so that a client that read the stream to its end can follow up on it at once."""
    try:
        async for item in items:
            yield item
        final = renderer.final_body()
        if final is not None:
            try:
                await kept(final)
            except Exception:  # the client has its answer: a follow-up will be told it is gone
                log.exception("keeping a streamed response failed")
    finally:
        await items.aclose()


responses = post_endpoint("/v1/responses", _responses)

ROUTES = [responses, *STORED_ROUTES]
