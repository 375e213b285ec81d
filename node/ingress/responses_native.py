"""A Responses request passed through to an upstream that speaks the Responses API (a
deployment with `responses = true`), and its answer made this node's.

The conversation stays with the node: a `previous_response_id` is expanded here into the
items it names (as for a translated request, `responses_stored.earlier_items`), and the
upstream is sent the whole `input` with `store: false`, so that it keeps nothing and the same
conversation continues on any deployment, a fallback or a peer. What would make the upstream
keep or run anything beyond this one answer is not sent either: `conversation` (state kept
upstream, in the node's account) and `background` (an answer generated after this request
ends, which the node could not count). What the upstream could not
take back under `store: false` is left out of the expanded history: the ids of items it never
kept, and reasoning items without their `encrypted_content`.

Its answer is passed on as it came, but for three fields of the `response` (of each snapshot
event of a stream) that only the node can say: its `id` (the node's `resp_…`, named for the
request as its usage row and receipt are, and the one a follow-up names), `store` and
`previous_response_id` (the client's, not what the upstream was sent).
"""

from __future__ import annotations

import msgspec
from msgspec import Raw

from adapters.events import NativeEvent
from adapters.openai_responses import OPENING, TERMINAL
from adapters.types import NativeRequest
from node.gateway.router import Route
from node.ingress.responses_wire import ResponsesRequest

_encode = msgspec.json.Encoder().encode
_fields = msgspec.json.Decoder(dict[str, Raw])
_FALSE = Raw(b"false")
_TRUE = Raw(b"true")
_NULL = Raw(b"null")
SNAPSHOTS = OPENING | TERMINAL
# The node keeps the conversation, and counts what each request writes while it runs.
_NOT_SENT = ("previous_response_id", "conversation", "background")


class _Kind(msgspec.Struct):
    type: str = "message"
    encrypted_content: str | None = None


_kind = msgspec.json.Decoder(_Kind)


def native_request(
    plan: list[Route], raw: dict[str, Raw], earlier: list[Raw], inputs: list[Raw]
) -> NativeRequest | None:
    """The request as a `responses` deployment of the plan gets it, if there is one."""
    if not any(route.adapter.upstream.responses for route in plan):
        return None
    fields = dict(raw)
    for name in _NOT_SENT:
        fields.pop(name, None)
    fields["store"] = _FALSE
    if earlier:
        fields["input"] = Raw(_encode([*_resendable(earlier), *inputs]))
    return NativeRequest("openai.responses", fields)


def _resendable(items: list[Raw]) -> list[Raw]:
    """Earlier items as an upstream that kept none of them can take them back."""
    kept = []
    for item in items:
        kind = _kind.decode(item)
        if kind.type == "reasoning":
            if kind.encrypted_content:  # stateless reasoning: the item whole, id and all
                kept.append(item)
            continue
        fields = _fields.decode(item)
        fields.pop("id", None)
        kept.append(Raw(_encode(fields)))
    return kept


def own_response(body: bytes, response_id: str, request: ResponsesRequest) -> bytes:
    """An upstream's `response` object with the node's id and the client's `store` and
    `previous_response_id`."""
    fields = msgspec.json.decode(body, type=dict[str, Raw])
    fields["id"] = Raw(_encode(response_id))
    fields["store"] = _FALSE if request.store is False else _TRUE
    previous = request.previous_response_id
    fields["previous_response_id"] = _NULL if previous is None else Raw(_encode(previous))
    return _encode(fields)


class _Failure(msgspec.Struct):
    code: str
    message: str


class NativeStream:
    """A passed-through stream's events, each snapshot's `response` made the node's; the last
    snapshot is kept (`final`), and events are counted, so that a failure after them
    (`failed`) is a `response.failed` of the response as its last snapshot told it, with the
    next `sequence_number`, as a translated stream's failure is."""

    def __init__(self, response_id: str, request: ResponsesRequest) -> None:
        self._id = response_id
        self._request = request
        self._events = 0
        self._snapshot: bytes | None = None
        self.final: bytes | None = None

    def failed(self, code: str, message: str) -> bytes:
        if self._snapshot is None:  # pragma: no cover - a stream opens with a snapshot
            fields: dict[str, Raw] = {"id": Raw(_encode(self._id))}
        else:
            fields = _fields.decode(self._snapshot)
        fields["status"] = Raw(b'"failed"')
        fields["error"] = Raw(_encode(_Failure(code, message)))
        self.final = response = _encode(fields)
        event = {
            "type": Raw(b'"response.failed"'),
            "response": Raw(response),
            "sequence_number": Raw(str(self._events).encode()),
        }
        self._events += 1
        return b"event: response.failed\ndata: " + _encode(event) + b"\n\n"

    def render(self, event: NativeEvent) -> bytes:
        self._events += 1
        if event.event not in SNAPSHOTS:
            return event.sse()
        try:
            fields = _fields.decode(event.data)
            snapshot = fields.get("response")
            response = own_response(snapshot, self._id, self._request) if snapshot else None
        except msgspec.DecodeError:  # `"response": null`, say: nothing of ours to say
            response = None
        if response is None:
            return event.sse()
        fields["response"] = Raw(response)
        self._snapshot = response
        if event.event in TERMINAL:
            self.final = response
        data = _encode(fields)
        return b"event: " + event.event.encode() + b"\ndata: " + data + b"\n\n"
