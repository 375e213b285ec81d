"""A mock AWS Bedrock runtime speaking the Converse API's real wire format.

`POST /model/{modelId}/converse` answers `mock says: <the last user text or tool result>`, one
word per token; `inferenceConfig.maxTokens` cuts the answer (`stopReason: "max_tokens"`) and a
word that is one of the `stopSequences` ends it (`"stop_sequence"`). Given tools (and no tool
result to read), it says `Let me check.` and calls every offered tool (only the named one for
`{"tool": …}`, without the words for `any`/`tool`): `{"city": "Paris"}` for a tool whose
schema has properties, `{}` otherwise. `/converse-stream` sends the same answer as AWS's binary
event stream (`application/vnd.amazon.eventstream`): `messageStart`, text in
`contentBlockDelta`s, a tool call's `contentBlockStart` then its input in fragments,
`contentBlockStop`, `messageStop`, `metadata` with the usage; each frame with its prelude,
string headers (`:event-type`, `:content-type`, `:message-type`) and CRCs, as AWS documents.
(botocore parses event streams but has no encoder, so frames are built here, in the mock only.)

Like AWS it verifies each request's SigV4 signature against the fake credentials it knows
(recomputed with botocore's signer over the request exactly as it arrived: raw path, signed
headers, body) and answers AWS's 403 bodies: `MissingAuthenticationTokenException`,
`UnrecognizedClientException` for an unknown key or session token, `InvalidSignatureException`
for a wrong secret, scope or an expired date; a Bedrock API key (`Authorization: Bearer`) is
taken too. It refuses unknown fields, roles that do not alternate, a conversation that does not
start with the user, blank text, tool blocks without a `toolConfig`, a `toolResult` that answers
no `toolUse` of the message before it, and answers an unknown model with
`ResourceNotFoundException`. Errors carry AWS's `x-amzn-ErrorType` header and `{"message": …}`
body. Every request is recorded in the script, which also queues failures and delays.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import struct
from typing import Annotated, Any, Literal
from urllib.parse import unquote

import msgspec
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from msgspec import Meta, Struct

from tests.mocks.script import Failure, MockScript, read_body, send_stream, wait_or_disconnect

ACCESS_KEY = "AKIAMOCKMOCKMOCK0001"
SECRET_KEY = "mock/secret/key/for/loopback/tests/only0"
REGION = "us-mock-1"
API_KEY = "ABSKbW9jay1iZWRyb2NrLWFwaS1rZXk="
_CORAL = ":http://internal.amazon.com/coral/com.amazon.bedrock/"
# How far a request's X-Amz-Date may be from the mock's clock, as AWS allows.
_SKEW = datetime.timedelta(minutes=5)

# --- the request, as strictly as Converse reads it --------------------------------------------


class _Strict(Struct, rename="camel", forbid_unknown_fields=True, omit_defaults=True):
    pass


class _ImageSource(_Strict):
    data: str = msgspec.field(name="bytes")


class _Image(_Strict):
    format: Literal["png", "jpeg", "gif", "webp"]
    source: _ImageSource


class _ToolUse(_Strict):
    tool_use_id: Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]+$", max_length=64)]
    name: str
    # Converse refuses a JSON string here, so the mock does too.
    input: dict[str, Any]


class _ResultContent(_Strict):
    text: str | None = None
    json: dict[str, Any] | None = None


class _ToolResult(_Strict):
    tool_use_id: str
    content: list[_ResultContent]
    status: Literal["success", "error"] | None = None


class _Block(_Strict):
    text: str | None = None
    image: _Image | None = None
    tool_use: _ToolUse | None = None
    tool_result: _ToolResult | None = None

    def __post_init__(self) -> None:
        members = [self.text, self.image, self.tool_use, self.tool_result]
        if sum(member is not None for member in members) != 1:
            raise ValueError("a ContentBlock must have exactly one member set")
        if self.text is not None and not self.text.strip():
            raise ValueError("text content blocks must be non-empty")


class _Message(_Strict):
    role: Literal["user", "assistant"]
    content: Annotated[list[_Block], Meta(min_length=1)]


class _System(_Strict):
    text: Annotated[str, Meta(min_length=1)]


class _Inference(_Strict):
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=1)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    stop_sequences: Annotated[list[str], Meta(max_length=4)] | None = None


class _Schema(_Strict):
    json: dict[str, Any]


class _Spec(_Strict):
    name: Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    input_schema: _Schema
    description: Annotated[str, Meta(min_length=1)] | None = None


class _Tool(_Strict):
    tool_spec: _Spec


class _Named(_Strict):
    name: str


class _Empty(_Strict):
    pass


class _Choice(_Strict):
    auto: _Empty | None = None
    any: _Empty | None = None
    tool: _Named | None = None


class _ToolConfig(_Strict):
    tools: Annotated[list[_Tool], Meta(min_length=1)]
    tool_choice: _Choice | None = None


class _Request(_Strict):
    messages: Annotated[list[_Message], Meta(min_length=1)]
    system: list[_System] | None = None
    inference_config: _Inference | None = None
    tool_config: _ToolConfig | None = None


# --- errors -----------------------------------------------------------------------------------


def aws_error(
    status: int, name: str, message: str, headers: dict[str, str] | None = None
) -> Failure:
    """An error as AWS's rest-json services answer it: the type in a header, the message in
    the body."""
    return Failure(
        status,
        msgspec.json.encode({"message": message}),
        {"x-amzn-ErrorType": name + _CORAL, "x-amzn-RequestId": "mock-request", **(headers or {})},
    )


THROTTLING = aws_error(
    429, "ThrottlingException", "Too many requests, please wait before trying again."
)
MODEL_NOT_READY = aws_error(429, "ModelNotReadyException", "Model is not ready for inference.")
VALIDATION = aws_error(400, "ValidationException", "Malformed input request, please reformat.")
TOO_LONG = aws_error(400, "ValidationException", "Input is too long for requested model.")
QUOTA = aws_error(
    400, "ServiceQuotaExceededException", "Your request exceeds the service quota for your account."
)
ACCESS_DENIED = aws_error(
    403,
    "AccessDeniedException",
    "You don't have access to the model with the specified model ID.",
)
NOT_FOUND = aws_error(404, "ResourceNotFoundException", "The specified model was not found.")
MODEL_TIMEOUT = aws_error(
    408, "ModelTimeoutException", "Model has timed out in processing the request."
)
MODEL_ERROR = aws_error(424, "ModelErrorException", "The model failed to process the request.")
INTERNAL = aws_error(500, "InternalServerException", "The server encountered an internal error.")
UNAVAILABLE = aws_error(503, "ServiceUnavailableException", "Service is temporarily unavailable.")
BAD_SIGNATURE_MESSAGE = (
    "The request signature we calculated does not match the signature you provided. Check your "
    "AWS Secret Access Key and signing method. Consult the service documentation for details."
)
_BAD_TOKEN = "The security token included in the request is invalid."


# --- the event stream's binary framing --------------------------------------------------------


def frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message: prelude (total length, headers length, CRC32 of both),
    headers (name length, name, type 7 = string, value length, value), payload, CRC32 of all
    before it. All integers big-endian."""
    encoded = b"".join(
        struct.pack(">B", len(name))
        + name.encode()
        + struct.pack(">BH", 7, len(value))
        + value.encode()
        for name, value in headers.items()
    )
    total = 12 + len(encoded) + len(payload) + 4
    prelude = struct.pack(">II", total, len(encoded))
    prelude += struct.pack(">I", binascii.crc32(prelude))
    message = prelude + encoded + payload
    return message + struct.pack(">I", binascii.crc32(message))


def event_frame(event_type: str, body: dict[str, Any]) -> bytes:
    # AWS pads payloads with a `p` member of varying length, so that sizes leak nothing.
    payload = msgspec.json.encode(
        {**body, "p": "abcdefghijklmnopqrstuvwxyzABCDEFGH"[: len(event_type)]}
    )
    headers = {
        ":event-type": event_type,
        ":content-type": "application/json",
        ":message-type": "event",
    }
    return frame(headers, payload)


def exception_frame(name: str, message: str) -> bytes:
    headers = {
        ":exception-type": name,
        ":content-type": "application/json",
        ":message-type": "exception",
    }
    return frame(headers, msgspec.json.encode({"message": message}))


# --- SigV4, checked ---------------------------------------------------------------------------


class _Signature(Struct):
    access_key: str
    scope: list[str]
    signed_headers: list[str]
    signature: str


def _parse_authorization(value: str) -> _Signature | None:
    algorithm, _, rest = value.partition(" ")
    if algorithm != "AWS4-HMAC-SHA256":
        return None
    fields = dict(part.strip().partition("=")[::2] for part in rest.split(","))
    credential = fields.get("Credential", "").split("/")
    if len(credential) != 5 or not fields.get("SignedHeaders") or not fields.get("Signature"):
        return None
    return _Signature(
        credential[0], credential[1:], fields["SignedHeaders"].split(";"), fields["Signature"]
    )


def verify_sigv4(
    keys: dict[str, tuple[str, str | None]],
    region: str,
    raw_path: str,
    headers: dict[str, str],
    body: bytes,
    now: datetime.datetime | None = None,
) -> Failure | None:
    """AWS's check of a SigV4-signed request: None if it holds, else the 403 AWS answers."""
    parsed = _parse_authorization(headers.get("authorization", ""))
    if parsed is None:
        return aws_error(403, "MissingAuthenticationTokenException", "Missing Authentication Token")
    if parsed.access_key not in keys:
        return aws_error(403, "UnrecognizedClientException", _BAD_TOKEN)
    secret, token = keys[parsed.access_key]
    if headers.get("x-amz-security-token") != token:
        return aws_error(403, "UnrecognizedClientException", _BAD_TOKEN)
    date, scope_region, service, terminator = parsed.scope
    amz_date = headers.get("x-amz-date", "")
    try:
        signed_at = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(
            tzinfo=datetime.UTC
        )
    except ValueError:
        return aws_error(403, "IncompleteSignatureException", "X-Amz-Date is missing or malformed")
    now = now or datetime.datetime.now(datetime.UTC)
    if abs(now - signed_at) > _SKEW:
        return aws_error(
            403,
            "InvalidSignatureException",
            f"Signature expired: {amz_date} is now earlier than allowed",
        )
    if (
        scope_region != region
        or service != "bedrock"
        or terminator != "aws4_request"
        or date != amz_date[:8]
    ):
        return aws_error(
            403,
            "InvalidSignatureException",
            f"Credential should be scoped to a valid region, not '{scope_region}'.",
        )
    if "host" not in parsed.signed_headers:
        return aws_error(
            403,
            "InvalidSignatureException",
            "'Host' must be a 'SignedHeader' in the AWS Authorization.",
        )
    # Re-sign what arrived, with the secret the mock knows, and compare.
    signed = {name: headers.get(name, "") for name in parsed.signed_headers if name != "host"}
    request = AWSRequest(
        method="POST", url=f"http://{headers.get('host', '')}{raw_path}", data=body, headers=signed
    )
    request.context["timestamp"] = amz_date
    signer = SigV4Auth(Credentials(parsed.access_key, secret, token), "bedrock", region)
    expected = signer.signature(
        signer.string_to_sign(request, signer.canonical_request(request)), request
    )
    if expected != parsed.signature:
        return aws_error(403, "InvalidSignatureException", BAD_SIGNATURE_MESSAGE)
    return None


# --- the mock ---------------------------------------------------------------------------------


class _Answer(Struct):
    words: list[str]
    calls: list[dict[str, Any]]
    stop_reason: str
    input_tokens: int


def _text_of(message: _Message) -> str:
    texts = []
    for block in message.content:
        if block.text is not None:
            texts.append(block.text)
        elif block.tool_result is not None:
            texts += [part.text for part in block.tool_result.content if part.text]
    return " ".join(texts)


def _conversation_problem(request: _Request) -> str | None:
    """What Converse refuses about the turns themselves, in its own words."""
    if request.messages[0].role != "user":
        return "A conversation must start with a user message."
    for before, after in zip(request.messages, request.messages[1:], strict=False):
        if before.role == after.role:
            return "A conversation must alternate between user and assistant roles."
    previous: set[str] = set()
    for message in request.messages:
        for block in message.content:
            if (block.tool_use or block.tool_result) and request.tool_config is None:
                return (
                    "The toolConfig field must be defined when using toolUse and toolResult "
                    "content blocks."
                )
            if block.tool_result is not None and block.tool_result.tool_use_id not in previous:
                return (
                    f"The toolResult block with id {block.tool_result.tool_use_id} has no "
                    "corresponding toolUse block in the previous turn."
                )
        previous = {block.tool_use.tool_use_id for block in message.content if block.tool_use}
    for message in request.messages:
        for block in message.content:
            if block.image is not None:
                try:
                    base64.b64decode(block.image.source.data, validate=True)
                except binascii.Error:
                    return "Invalid image bytes: the image is not valid base64."
    return None


class BedrockMock:
    def __init__(
        self,
        script: MockScript | None = None,
        models: tuple[str, ...] = ("anthropic.claude-mock-v1:0",),
        keys: dict[str, tuple[str, str | None]] | None = None,
        region: str = REGION,
        api_key: str | None = API_KEY,
    ) -> None:
        self.script = script or MockScript()
        self.models = set(models)
        self.keys = keys if keys is not None else {ACCESS_KEY: (SECRET_KEY, None)}
        self.region = region
        self.api_key = api_key
        # Prompt tokens read from, or written to, the prompt cache: counted beside
        # `inputTokens` by AWS.
        self.cache_read = 0
        self.cache_write = 0
        self.stop_reason: str | None = None
        self._stream_exception: tuple[str, str, int] | None = None
        self._calls = 0

    def fail_stream_next(self, name: str, message: str, after: int) -> None:
        """Make the next stream send `after` frames, then an exception frame `name`."""
        self._stream_exception = (name, message, after)

    def reset(self) -> None:
        self.script = MockScript()
        self.cache_read = self.cache_write = 0
        self.stop_reason = None
        self._stream_exception = None
        self._calls = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        raw_path = scope.get("raw_path", scope["path"].encode()).decode()
        self.script.record(raw_path, headers, body)
        failure = self.script.next_failure()
        if failure is not None:
            return await _send(send, failure.status, failure.body, failure.headers)
        if await wait_or_disconnect(receive, self.script.delay):
            self.script.note_cancelled()
            return None
        refusal = self._authenticate(raw_path, headers, body)
        if refusal is not None:
            return await _send(send, refusal.status, refusal.body, refusal.headers)
        parts = raw_path.split("/")
        if (
            scope["method"] != "POST"
            or len(parts) != 4
            or parts[1] != "model"
            or parts[3] not in ("converse", "converse-stream")
        ):
            failure = aws_error(404, "UnknownOperationException", "Unknown operation")
            return await _send(send, failure.status, failure.body, failure.headers)
        model = unquote(parts[2])
        if model not in self.models:
            return await _send(send, NOT_FOUND.status, NOT_FOUND.body, NOT_FOUND.headers)
        return await self._converse(body, parts[3] == "converse-stream", send, receive)

    def _authenticate(self, raw_path: str, headers: dict[str, str], body: bytes) -> Failure | None:
        authorization = headers.get("authorization", "")
        if authorization.startswith("Bearer "):
            if self.api_key is not None and authorization == f"Bearer {self.api_key}":
                return None
            return aws_error(
                403,
                "UnrecognizedClientException",
                "Invalid API Key format: Must start with pre-defined prefix",
            )
        return verify_sigv4(self.keys, self.region, raw_path, headers, body)

    async def _converse(self, body: bytes, stream: bool, send: Any, receive: Any) -> None:
        try:
            request = msgspec.json.decode(body, type=_Request)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            failure = aws_error(400, "ValidationException", f"Malformed input request: {exc}")
            return await _send(send, failure.status, failure.body, failure.headers)
        problem = _conversation_problem(request)
        if problem is not None:
            failure = aws_error(400, "ValidationException", problem)
            return await _send(send, failure.status, failure.body, failure.headers)
        self._calls += 1
        answer = self._answer(request)
        if stream:
            return await self._stream(answer, send, receive)
        content: list[dict[str, Any]] = []
        if answer.words:
            content.append({"text": " ".join(answer.words)})
        content += [{"toolUse": call} for call in answer.calls]
        reply = {
            "output": {"message": {"role": "assistant", "content": content}},
            "stopReason": answer.stop_reason,
            "usage": self._usage(answer),
            "metrics": {"latencyMs": 12},
        }
        await _send(send, 200, msgspec.json.encode(reply), {"content-type": "application/json"})

    def _answer(self, request: _Request) -> _Answer:
        system = " ".join(block.text for block in request.system or ())
        input_tokens = len(system.split()) + sum(
            len(_text_of(m).split()) + 3 for m in request.messages
        )
        last = request.messages[-1]
        answered = any(block.tool_result is not None for block in last.content)
        config = request.tool_config
        if config is not None and not answered:
            choice = config.tool_choice or _Choice(auto=_Empty())
            tools = [tool.tool_spec for tool in config.tools]
            if choice.tool is not None:
                tools = [tool for tool in tools if tool.name == choice.tool.name]
            calls = [
                {
                    "toolUseId": f"tooluse_mock{self._calls:04d}{number}",
                    "name": tool.name,
                    "input": {"city": "Paris"} if tool.input_schema.json.get("properties") else {},
                }
                for number, tool in enumerate(tools)
            ]
            words = [] if choice.auto is None else ["Let", "me", "check."]
            return _Answer(words, calls, "tool_use", input_tokens)
        user = next((m for m in reversed(request.messages) if m.role == "user"), last)
        words = ("mock says: " + _text_of(user)).split(" ")
        stop_reason = self.stop_reason or "end_turn"
        inference = request.inference_config or _Inference()
        for index, word in enumerate(words):
            if word in (inference.stop_sequences or ()):
                words, stop_reason = words[:index], "stop_sequence"
                break
        if inference.max_tokens is not None and len(words) > inference.max_tokens:
            words, stop_reason = words[: inference.max_tokens], "max_tokens"
        return _Answer(words, [], stop_reason, input_tokens)

    def _usage(self, answer: _Answer) -> dict[str, int]:
        output = len(answer.words) + 10 * len(answer.calls)
        usage = {
            "inputTokens": answer.input_tokens,
            "outputTokens": output,
            "totalTokens": answer.input_tokens + output + self.cache_read + self.cache_write,
        }
        if self.cache_read or self.cache_write:
            usage["cacheReadInputTokens"] = self.cache_read
            usage["cacheWriteInputTokens"] = self.cache_write
        return usage

    async def _stream(self, answer: _Answer, send: Any, receive: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/vnd.amazon.eventstream"),
                    (b"x-amzn-requestid", b"mock-request"),
                ],
            }
        )
        frames = [event_frame("messageStart", {"role": "assistant"})]
        block = 0
        if answer.words:
            for i, word in enumerate(answer.words):
                delta = {"text": word if i == 0 else " " + word}
                frames.append(
                    event_frame("contentBlockDelta", {"contentBlockIndex": block, "delta": delta})
                )
            frames.append(event_frame("contentBlockStop", {"contentBlockIndex": block}))
            block += 1
        for call in answer.calls:
            start = {"toolUse": {"toolUseId": call["toolUseId"], "name": call["name"]}}
            frames.append(
                event_frame("contentBlockStart", {"contentBlockIndex": block, "start": start})
            )
            if call["input"]:
                # The input arrives as JSON text in pieces that split keys and values anywhere.
                for piece in ['{"ci', 'ty": "Par', 'is"}']:
                    delta = {"toolUse": {"input": piece}}
                    frames.append(
                        event_frame(
                            "contentBlockDelta", {"contentBlockIndex": block, "delta": delta}
                        )
                    )
            frames.append(event_frame("contentBlockStop", {"contentBlockIndex": block}))
            block += 1
        frames.append(event_frame("messageStop", {"stopReason": answer.stop_reason}))
        frames.append(
            event_frame("metadata", {"usage": self._usage(answer), "metrics": {"latencyMs": 12}})
        )
        failure, self._stream_exception = self._stream_exception, None
        if failure is not None:
            name, message, after = failure
            frames = [*frames[:after], exception_frame(name, message)]
        cut = self.script.cut_stream_after
        if cut is not None:
            frames = frames[:cut]
        await send_stream(self.script, receive, send, frames)


async def _send(send: Any, status: int, body: bytes, headers: dict[str, str]) -> None:
    raw_headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    if not any(name == b"content-type" for name, _ in raw_headers):
        raw_headers.append((b"content-type", b"application/json"))
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})
