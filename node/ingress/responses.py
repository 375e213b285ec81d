"""The OpenAI Responses API endpoint: `POST /v1/responses`, plain and streamed.

Decode the body (`responses_wire`), translate it into the chat call every adapter takes
(`responses_chat`), run it through the request pipeline as a chat request (admission,
routing, budgets, usage and receipts are the pipeline's, as for chat completions), and
render what comes back as a `response` object or the Responses stream's typed events
(`responses_render`). Errors are OpenAI's, as on every OpenAI surface.
"""

from __future__ import annotations

import msgspec
from litestar import Request

from adapters.types import ChatResult
from federation.ids import new_request_id
from node.gateway import pipeline
from node.gateway.pipeline import chat_worst_case
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
from node.ingress.openai import decode_body, response_headers
from node.ingress.responses_chat import chat_call
from node.ingress.responses_render import Shell, StreamRenderer, complete_body
from node.ingress.responses_wire import ResponsesRequest

_decoder = msgspec.json.Decoder(ResponsesRequest)


async def _responses(request: Request) -> Reply | StreamReply:
    principal = await authenticate(request)  # a bad key is told so before a bad body
    body, _ = decode_body(await read_body(request, principal), _decoder)
    call = chat_call(body, new_request_id())
    chat = call.request
    admitted = await pipeline.begin(
        hub_of(request),
        caller_of(request, principal),
        chat.model,
        "chat",
        call.request_id,
        lambda plan: chat_worst_case(chat, plan),
    )
    shell = Shell.of(body, call.request_id)
    if chat.stream:
        streamed = await pipeline.stream(admitted, call, watcher_of(request))
        headers = {**response_headers(streamed.facts), "cache-control": "no-cache"}
        render = StreamRenderer(shell).render
        return StreamReply(streamed.items, headers, render, streamed.abandon)
    answer = await pipeline.complete(
        admitted, lambda route: route.adapter.chat(call), watcher_of(request)
    )
    assert isinstance(answer.result, ChatResult)
    return Reply(complete_body(shell, answer.result), response_headers(answer.facts))


responses = post_endpoint("/v1/responses", _responses)

ROUTES = [responses]
