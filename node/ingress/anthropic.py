"""Anthropic's Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

Only Anthropic's surface lives here: authenticate (`x-api-key`, or `Authorization: Bearer`),
decode a Messages body and translate it into the adapters' call
(`node/ingress/anthropic_request.py`), hand it to the request pipeline
(`node/gateway/pipeline.py`: admission, budgets, routing, the upstream call, settlement, usage)
exactly as the OpenAI ingress does, and render what comes back as Anthropic's `message` or its
SSE events (`node/ingress/anthropic_render.py`), failures as Anthropic's errors
(`node/ingress/anthropic_errors.py`). Any deployment serves it through its adapter, the
request translated; an Anthropic deployment instead gets the client's own request
(`ChatCall.native`: `thinking`, `top_k`, `cache_control`, documents and citations reach it
untouched, only `model` and the output cap set) and its answer and events come back as they
came. The client's `anthropic-version` and `anthropic-beta` reach an Anthropic upstream either
way, as sent. Through a peer the request is translated (peers speak chat completions).
"""

from __future__ import annotations

import re

import msgspec
from litestar import Request
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

from adapters.tokens import MESSAGE_OVERHEAD, estimate_prompt_tokens, estimate_text_tokens
from adapters.types import ChatCall, ChatRequest, ChatResult, NamedToolChoice, NativeRequest
from federation.ids import new_request_id
from federation.transport import SERVED_BY_HEADER, served_by_value
from node.errors import HubError, Kind
from node.gateway import pipeline
from node.gateway.auth import Principal
from node.gateway.pipeline import Facts, may_use
from node.gateway.router import Route
from node.hub import hub_of
from node.ingress import anthropic_errors
from node.ingress.anthropic_render import MessageStreamRenderer, message_body
from node.ingress.anthropic_request import CountTokensRequest, MessagesRequest, chat_request
from node.ingress.asgi import (
    JSON,
    Reply,
    StreamReply,
    begin_chat,
    client_ip,
    local_only,
    post_endpoint,
    read_body,
    watcher_of,
)
from node.ingress.cache import CACHE_HEADER, cache_bypass
from node.ingress.headers import headers_of
from node.ingress.openai import decode_body

_messages_decoder = msgspec.json.Decoder(MessagesRequest)
_count_decoder = msgspec.json.Decoder(CountTokensRequest)
_raw_fields = msgspec.json.Decoder(dict[str, msgspec.Raw])
_encode = msgspec.json.Encoder().encode


class TokenCount(msgspec.Struct):
    input_tokens: int


async def authenticate(request: Request) -> Principal:
    """The caller's key, sent as Anthropic's clients send it (`x-api-key`) or as a bearer
    token (the SDK's `auth_token`, and every other surface's way)."""
    headers = headers_of(request)
    authorization = headers.get("authorization")
    api_key = headers.get("x-api-key")
    if authorization is None and api_key:
        authorization = f"Bearer {api_key}"
    return await hub_of(request).keys.authenticate(authorization, client_ip(request))


# Client headers an Anthropic upstream is told (the API version, beta features); nothing else
# a client sends reaches a provider. A value is bounded and plain (`2023-06-01`,
# `prompt-caching-2024-07-31,…`): anything else is not passed on.
FORWARDED = ("anthropic-version", "anthropic-beta")
_FORWARDABLE = re.compile(r"[A-Za-z0-9._,= -]{1,256}")


def forward_headers(request: Request) -> dict[str, str]:
    """The whitelisted Anthropic headers of a Messages request, for the Anthropic adapter."""
    found = {}
    headers = headers_of(request)
    for name in FORWARDED:
        value = headers.get(name)
        if value is not None and _FORWARDABLE.fullmatch(value):
            found[name] = value
    return found


def _call(chat: ChatRequest, forwarded: dict[str, str]) -> ChatCall:
    """The adapters' call. Its raw fields, what an OpenAI-compatible upstream is sent, are
    the translated request's: none of Anthropic's own fields. A tool's and a named tool
    choice's `type` is a default the Structs omit, but OpenAI's API requires it."""
    raw = _raw_fields.decode(_encode(chat))
    if chat.tools:
        tools = [{"type": "function", "function": tool.function} for tool in chat.tools]
        raw["tools"] = msgspec.Raw(_encode(tools))
    if isinstance(chat.tool_choice, NamedToolChoice):
        choice = {"type": "function", "function": chat.tool_choice.function}
        raw["tool_choice"] = msgspec.Raw(_encode(choice))
    return ChatCall(chat, raw, new_request_id(), forwarded)


def _headers(facts: Facts) -> dict[str, str]:
    headers = {"aihub-request-id": facts.request_id, **facts.limits}
    if facts.cost_micros is not None:
        headers["aihub-cost-micros"] = str(facts.cost_micros)
    if facts.served_by is not None:
        headers[SERVED_BY_HEADER] = served_by_value(facts.served_by)
    if facts.cache is not None:
        headers[CACHE_HEADER] = facts.cache
    return headers


def _native(plan: list[Route], raw: dict[str, msgspec.Raw]) -> NativeRequest | None:
    """The client's own request, if an Anthropic deployment may serve it."""
    if any(route.adapter.upstream.provider == "anthropic" for route in plan):
        return NativeRequest("anthropic.messages", raw)
    return None


async def _messages(request: Request) -> Reply | StreamReply:
    principal = await authenticate(request)  # a bad key is told so before a bad body
    body = await read_body(request, principal)
    messages, raw = decode_body(body, _messages_decoder)
    bypass = cache_bypass(request, raw)
    chat = chat_request(messages)
    call = _call(chat, forward_headers(request))
    hub = hub_of(request)
    slot = hub.cache.slot(principal, "anthropic.messages", call, raw, bypass)
    admitted = await begin_chat(request, principal, call, slot)
    call.native = _native(admitted.plan, raw)
    admitted.books.log = hub.logs.draft(principal, body)
    stops = messages.stop_sequences
    if chat.stream:
        streamed = await pipeline.stream(admitted, call, watcher_of(request), cache=slot)
        headers = {**_headers(streamed.facts), "cache-control": "no-cache"}
        prompt = estimate_prompt_tokens(chat.messages)
        renderer = MessageStreamRenderer(call.request_id, chat.model, prompt, stops)
        return StreamReply(streamed.items, headers, renderer.render, streamed.abandon)
    answer = await pipeline.complete(
        admitted, lambda route: route.adapter.chat(call), watcher_of(request), call, slot
    )
    assert isinstance(answer.result, ChatResult)
    reply = message_body(answer.result, call.request_id, chat.model, stops)
    return Reply(reply, _headers(answer.facts))


def _count(chat: ChatRequest) -> int:
    """The gateway's own estimate of a prompt (`adapters/tokens.py`), its tools included."""
    tools = sum(
        MESSAGE_OVERHEAD + estimate_text_tokens(_encode(tool.function).decode())
        for tool in chat.tools or ()
    )
    return estimate_prompt_tokens(chat.messages) + tools


async def _count_tokens(request: Request) -> Reply:
    principal = await authenticate(request)
    counted, _ = decode_body(await read_body(request, principal), _count_decoder)
    model = counted.model
    if not may_use(principal, model):
        message = f"This key may not use the model `{model}`"
        raise HubError(Kind.FORBIDDEN, message, code="model_not_allowed", param="model")
    if not hub_of(request).router.serves(model, "chat", local_only=local_only(request, principal)):
        message = f"The model `{model}` does not exist on this node"
        raise HubError(Kind.NOT_FOUND, message, code="model_not_found", param="model")
    return Reply(_encode(TokenCount(_count(chat_request(counted)))), {})


messages = post_endpoint(
    "/v1/messages", _messages, exception_handlers=anthropic_errors.EXCEPTION_HANDLERS
)
count_tokens = post_endpoint(
    "/v1/messages/count_tokens",
    _count_tokens,
    exception_handlers=anthropic_errors.EXCEPTION_HANDLERS,
)

ROUTES = [messages, count_tokens]


def document(openapi: OpenAPI) -> None:
    """Describe the two ASGI endpoints in the app's OpenAPI schema (Litestar lists only the
    routes it answers itself). Their bodies are Anthropic's: its API reference is the spec."""
    body = {JSON: OpenAPIMediaType(schema=Schema(type=OpenAPIType.OBJECT))}
    paths = dict(openapi.paths or {})
    for path, operation_id, summary, answer in (
        ("/v1/messages", "createMessage", "Create a message", "A message, or its SSE events"),
        ("/v1/messages/count_tokens", "countTokens", "Count a message's input tokens", "The count"),
    ):
        paths[path] = PathItem(
            post=Operation(
                operation_id=operation_id,
                summary=f"{summary} (Anthropic Messages API)",
                request_body=RequestBody(content=body, required=True),
                responses={"200": OpenAPIResponse(description=answer, content=body)},
            )
        )
    openapi.paths = paths
