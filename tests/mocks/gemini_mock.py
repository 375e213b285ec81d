"""A mock of Google's Gemini API and of Vertex AI, speaking their real wire formats, with a
mock OAuth token endpoint for Vertex's service accounts.

Routes:

- `POST /v1beta/models/{model}:generateContent` (and `/v1/…`), `:streamGenerateContent?alt=sse`,
  `:embedContent`, `:batchEmbedContents`: the Gemini API, keyed by `x-goog-api-key`.
- `POST /v1/projects/{p}/locations/{l}/publishers/google/models/{model}:{method}`: the same
  Gemini body on Vertex AI (and `:predict` for embeddings), keyed by a bearer token the token
  endpoint issued; `publishers/anthropic/…:rawPredict` and `:streamRawPredict`: the Messages
  body without `model` and with `anthropic_version: "vertex-2023-10-16"`, answered by an
  `AnthropicMock`.
- `POST /token`: Google's OAuth token endpoint for the JWT bearer grant. It checks the signed
  assertion against the fake service account's public key (signature, audience, expiry,
  issuer, scope) and issues `ya29.mock…` tokens that live `token_lifetime` seconds.

The model answers `mock says: <the last user text or function result>`, one word per SSE
event when streamed; `maxOutputTokens` cuts it (`MAX_TOKENS`), a word that is one of the
`stopSequences` ends it. Given function declarations (and a mode other than `NONE`) and no
function result to read, it says `Let me check.` (not in `ANY` mode) and calls every declared
function (only the allowed ones), each call its own event when streamed: `{"city": "Paris"}`
for a function whose schema has properties, `{}` otherwise. Its first call of a turn carries a
`thoughtSignature`, and, like Gemini 3, it refuses a request whose model turn's first call
comes back without it. It refuses unknown fields, function results that answer no call of the
model turn before them, and an empty `contents`. A prompt containing `BLOCKME` is blocked
(`promptFeedback.blockReason: SAFETY`); an answer to `UNSAFE` stops with `SAFETY`.
`candidateCount` gives that many candidates (each one's words prefixed by its index past the
first). `thoughts` and `cached` add thinking and cached tokens to `usageMetadata`.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import re
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs

import msgspec
from msgspec import Meta, Struct

from tests.mocks.anthropic_mock import AnthropicMock
from tests.mocks.script import Failure, MockScript, read_body, send_stream, wait_or_disconnect

SIGNATURE = base64.b64encode(b"mock thought signature \x00\xff").decode()
VERTEX_ANTHROPIC_VERSION = "vertex-2023-10-16"
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"

# --- the request, as strictly as Google reads it ---------------------------------------------


class _Blob(Struct, rename="camel", forbid_unknown_fields=True):
    mime_type: str
    data: str


class _FileData(Struct, rename="camel", forbid_unknown_fields=True):
    mime_type: str
    file_uri: str


class _FunctionCall(Struct, forbid_unknown_fields=True):
    name: str
    args: dict[str, Any] = {}
    id: str | None = None


class _FunctionResponse(Struct, forbid_unknown_fields=True):
    name: str
    response: dict[str, Any]
    id: str | None = None


class _Part(Struct, rename="camel", forbid_unknown_fields=True):
    text: str | None = None
    inline_data: _Blob | None = None
    file_data: _FileData | None = None
    function_call: _FunctionCall | None = None
    function_response: _FunctionResponse | None = None
    thought_signature: str | None = None
    thought: bool | None = None

    def __post_init__(self) -> None:
        data = [self.text, self.inline_data, self.file_data]
        data += [self.function_call, self.function_response]
        if sum(item is not None for item in data) != 1:
            raise ValueError("a part must hold exactly one kind of data")


class _Content(Struct, forbid_unknown_fields=True):
    parts: Annotated[list[_Part], Meta(min_length=1)]
    role: Literal["user", "model"] | None = None


class _Declaration(Struct, rename="camel", forbid_unknown_fields=True):
    name: Annotated[str, Meta(pattern=r"^[a-zA-Z_][a-zA-Z0-9_.:-]{0,63}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    parameters_json_schema: dict[str, Any] | None = None


class _Tool(Struct, rename="camel", forbid_unknown_fields=True):
    function_declarations: list[_Declaration] = []


class _CallingConfig(Struct, rename="camel", forbid_unknown_fields=True):
    mode: Literal["AUTO", "ANY", "NONE", "VALIDATED"] = "AUTO"
    allowed_function_names: list[str] | None = None


class _ToolConfig(Struct, rename="camel", forbid_unknown_fields=True):
    function_calling_config: _CallingConfig


class _GenerationConfig(Struct, rename="camel", forbid_unknown_fields=True):
    stop_sequences: Annotated[list[str], Meta(max_length=5)] | None = None
    response_mime_type: Literal["text/plain", "application/json", "text/x.enum"] | None = None
    response_schema: dict[str, Any] | None = None
    response_json_schema: dict[str, Any] | None = None
    candidate_count: Annotated[int, Meta(ge=1, le=8)] | None = None
    max_output_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    top_k: int | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class _Request(Struct, rename="camel", forbid_unknown_fields=True):
    contents: Annotated[list[_Content], Meta(min_length=1)]
    system_instruction: _Content | None = None
    tools: list[_Tool] | None = None
    tool_config: _ToolConfig | None = None
    generation_config: _GenerationConfig | None = None
    safety_settings: list[dict[str, Any]] | None = None


class _EmbedRequest(Struct, rename="camel", forbid_unknown_fields=True):
    content: _Content
    model: str | None = None
    task_type: str | None = None
    output_dimensionality: Annotated[int, Meta(ge=1, le=3072)] | None = None


class _BatchEmbedRequest(Struct, forbid_unknown_fields=True):
    requests: Annotated[list[_EmbedRequest], Meta(min_length=1, max_length=100)]


class _PredictInstance(Struct, forbid_unknown_fields=True):
    content: str
    task_type: str | None = None


class _PredictParameters(Struct, rename="camel", forbid_unknown_fields=True):
    output_dimensionality: int | None = None


class _PredictRequest(Struct, forbid_unknown_fields=True):
    instances: Annotated[list[_PredictInstance], Meta(min_length=1, max_length=250)]
    parameters: _PredictParameters | None = None


# --- errors -----------------------------------------------------------------------------------

_CODE_OF_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


def google_error(
    status: str, message: str, details: list[dict[str, Any]] | None = None, **headers: str
) -> Failure:
    code = _CODE_OF_STATUS[status]
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return Failure(code, msgspec.json.encode({"error": error}), dict(headers))


def _error_info(reason: str) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": reason,
        "domain": "googleapis.com",
    }


# Each error Google documents for the Gemini API, in its own words.
INVALID_ARGUMENT = google_error(
    "INVALID_ARGUMENT", "Request contains an invalid argument.", [_error_info("BAD_REQUEST")]
)
TOO_LONG = google_error(
    "INVALID_ARGUMENT",
    "The input token count (1234567) exceeds the maximum number of tokens allowed (1048576).",
)
API_KEY_INVALID = google_error(
    "INVALID_ARGUMENT",
    "API key not valid. Please pass a valid API key.",
    [_error_info("API_KEY_INVALID")],
)
FAILED_PRECONDITION = google_error(
    "FAILED_PRECONDITION", "User location is not supported for the API use."
)
PERMISSION_DENIED = google_error(
    "PERMISSION_DENIED", "You do not have permission to access the requested resource."
)
NOT_FOUND = google_error(
    "NOT_FOUND",
    "models/gemini-nope is not found for API version v1beta, or is not supported for "
    "generateContent.",
)
RESOURCE_EXHAUSTED = google_error(
    "RESOURCE_EXHAUSTED",
    "You exceeded your current quota, please check your plan and billing details.",
    [
        {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [{"quotaMetric": "generate_content_free_tier_requests"}],
        },
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"},
    ],
)
INTERNAL = google_error("INTERNAL", "An internal error has occurred.")
UNAVAILABLE = google_error("UNAVAILABLE", "The model is overloaded. Please try again later.")
DEADLINE_EXCEEDED = google_error("DEADLINE_EXCEEDED", "Deadline expired before operation.")
UNAUTHENTICATED = google_error("UNAUTHENTICATED", "Request had invalid authentication credentials.")

# --- a fake service account -------------------------------------------------------------------


def fake_service_account(token_uri: str, project: str = "mock-project") -> tuple[dict, bytes]:
    """A service-account key file's JSON with a new RSA key, and that key's public half."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    info = {
        "type": "service_account",
        "project_id": project,
        "private_key_id": hashlib.sha1(public).hexdigest(),
        "private_key": private,
        "client_email": f"aihub-test@{project}.iam.gserviceaccount.com",
        "client_id": "100000000000000000001",
        "token_uri": token_uri,
    }
    return info, public


# --- the mock ---------------------------------------------------------------------------------


class _Answer(Struct):
    words: list[str]
    calls: list[dict[str, Any]]
    finish: str


_GEMINI_PATH = re.compile(r"^/(v1|v1beta)/models/([^/:]+):([A-Za-z]+)$")
_VERTEX_PATH = re.compile(
    r"^/(v1|v1beta1)/projects/([^/]+)/locations/([^/]+)/publishers/(google|anthropic)"
    r"/models/([^/:]+):([A-Za-z]+)$"
)


class GeminiMock:
    def __init__(
        self,
        script: MockScript | None = None,
        models: tuple[str, ...] = ("gemini-mock", "gemini-embed-mock", "gemini-embedding-mock"),
        api_key: str | None = "gm-mock-key",
        project: str = "mock-project",
        location: str = "us-central1",
        anthropic: AnthropicMock | None = None,
    ) -> None:
        self.script = script or MockScript()
        self.models = set(models)
        self.api_key = api_key
        self.project = project
        self.location = location
        # Anthropic's models on Vertex; their own key check is off (Vertex's token is used).
        self.anthropic = anthropic or AnthropicMock(models=("claude-mock",), api_key=None)
        # The fake service account's public key, set by the test; the tokens issued.
        self.public_key: bytes | None = None
        self.client_email: str | None = None
        self.token_uri: str | None = None
        self.token_lifetime = 3600
        self.tokens_issued: list[str] = []
        self.token_refusals = 0
        self.thoughts = 0
        self.cached = 0
        self._stream_error: tuple[str, str, int] | None = None
        self._counter = itertools.count(1)

    def trust(self, info: dict[str, Any], public_key: bytes) -> None:
        """Accept assertions signed by this service account's key."""
        self.public_key = public_key
        self.client_email = info["client_email"]
        self.token_uri = info["token_uri"]

    def fail_stream_next(self, status: str, message: str, after: int) -> None:
        """Make the next stream send `after` events, then an error event."""
        self._stream_error = (status, message, after)

    def reset(self) -> None:
        self.script = MockScript()
        self.anthropic.reset()
        self.thoughts = self.cached = 0
        self.token_lifetime = 3600
        self.tokens_issued = []
        self.token_refusals = 0
        self._stream_error = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        path = scope["path"]
        query = parse_qs(scope.get("query_string", b"").decode())
        if path == "/token" and scope["method"] == "POST":
            return await self._token(body, send)
        self.script.record(path, headers, body)
        failure = self.script.next_failure()
        if failure is not None:
            return await _send_failure(send, failure)
        if await wait_or_disconnect(receive, self.script.delay):
            self.script.note_cancelled()
            return None
        if scope["method"] != "POST":
            return await _send_failure(send, google_error("NOT_FOUND", "Not Found"))
        gemini = _GEMINI_PATH.match(path)
        if gemini is not None:
            refusal = self._api_key_refusal(headers)
            if refusal is not None:
                return await _send_failure(send, refusal)
            _, model, method = gemini.groups()
            return await self._google(model, method, query, body, send, receive)
        vertex = _VERTEX_PATH.match(path)
        if vertex is None:
            return await _send_failure(send, google_error("NOT_FOUND", f"{path} is not found"))
        _, project, location, publisher, model, method = vertex.groups()
        if headers.get("authorization", "").removeprefix("Bearer ") not in self.tokens_issued:
            return await _send_failure(send, UNAUTHENTICATED)
        if (project, location) != (self.project, self.location):
            message = f"Permission denied on resource project {project} in {location}."
            return await _send_failure(send, google_error("PERMISSION_DENIED", message))
        if publisher == "anthropic":
            return await self._vertex_anthropic(model, method, headers, body, send, receive)
        return await self._google(model, method, query, body, send, receive)

    def _api_key_refusal(self, headers: dict[str, str]) -> Failure | None:
        if self.api_key is None:
            return None
        key = headers.get("x-goog-api-key")
        if key is None:
            message = "Method doesn't allow unregistered callers. Please use API Key."
            return google_error("PERMISSION_DENIED", message)
        return None if key == self.api_key else API_KEY_INVALID

    # --- OAuth ----------------------------------------------------------------------------

    async def _token(self, body: bytes, send: Any) -> None:
        from google.auth import jwt

        form = parse_qs(body.decode())
        grant = form.get("grant_type", [""])[0]
        assertion = form.get("assertion", [""])[0]
        try:
            if grant != "urn:ietf:params:oauth:grant-type:jwt-bearer" or self.public_key is None:
                raise ValueError(f"unsupported grant {grant!r}")
            # google-auth names Google's own token endpoint as the audience, wherever the
            # key's token_uri points.
            audience = [self.token_uri, GOOGLE_TOKEN_AUDIENCE]
            claims = jwt.decode(assertion, certs=self.public_key, audience=audience)
            # `decode` checked the signature, the audience and the times (iat, exp).
            if claims.get("iss") != self.client_email or SCOPE not in claims.get("scope", ""):
                raise ValueError("wrong issuer or scope")
        except ValueError as exc:
            self.token_refusals += 1
            refusal = {"error": "invalid_grant", "error_description": f"Invalid JWT: {exc}"}
            return await _send(send, 400, msgspec.json.encode(refusal))
        token = f"ya29.mock{next(self._counter):04d}"
        self.tokens_issued.append(token)
        answer = {"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer"}
        await _send(send, 200, msgspec.json.encode(answer))

    # --- Gemini's methods -----------------------------------------------------------------

    async def _google(
        self, model: str, method: str, query: dict, body: bytes, send: Any, receive: Any
    ) -> None:
        if model not in self.models:
            message = (
                f"models/{model} is not found for API version v1beta, or is not supported "
                f"for {method}."
            )
            return await _send_failure(send, google_error("NOT_FOUND", message))
        if method in ("generateContent", "streamGenerateContent"):
            request = _decode(body, _Request)
            if isinstance(request, Failure):
                return await _send_failure(send, request)
            refusal = _conversation_refusal(request)
            if refusal is not None:
                return await _send_failure(send, google_error("INVALID_ARGUMENT", refusal))
            if method == "generateContent":
                return await _send(send, 200, msgspec.json.encode(self._whole(request)))
            if query.get("alt") != ["sse"]:
                message = "this mock streams only server-sent events (alt=sse)"
                return await _send_failure(send, google_error("INVALID_ARGUMENT", message))
            return await self._stream(request, send, receive)
        if method in ("embedContent", "batchEmbedContents", "predict"):
            return await self._embed(model, method, body, send)
        message = f"Method {method} is not found"
        return await _send_failure(send, google_error("NOT_FOUND", message))

    def _answers(self, request: _Request) -> list[_Answer]:
        config = request.generation_config or _GenerationConfig()
        count = config.candidate_count or 1
        answers = []
        for index in range(count):
            answer = self._answer(request, config)
            if index:
                answer.words = [f"[{index}]", *answer.words]
            answers.append(answer)
        return answers

    def _answer(self, request: _Request, config: _GenerationConfig) -> _Answer:
        last = request.contents[-1]
        answered = any(part.function_response for part in last.parts)
        calling = (request.tool_config or _ToolConfig(_CallingConfig())).function_calling_config
        declared = [d for tool in request.tools or () for d in tool.function_declarations]
        if declared and calling.mode != "NONE" and not answered:
            allowed = calling.allowed_function_names
            chosen = [d for d in declared if allowed is None or d.name in allowed]
            calls = []
            for declaration in chosen:
                schema = declaration.parameters_json_schema or declaration.parameters or {}
                args = {"city": "Paris"} if schema.get("properties") else {}
                calls.append({"name": declaration.name, "args": args})
            words = [] if calling.mode == "ANY" else ["Let", "me", "check."]
            return _Answer(words, calls, "STOP")
        text = _user_text(request)
        if "BLOCKME" in text:
            return _Answer([], [], "BLOCKED")
        if "UNSAFE" in text:
            return _Answer(["mock", "says:"], [], "SAFETY")
        if config.response_mime_type == "application/json":
            return _Answer([msgspec.json.encode({"said": text}).decode()], [], "STOP")
        words = ("mock says: " + text).split(" ")
        finish = "STOP"
        for index, word in enumerate(words):
            if word in (config.stop_sequences or ()):
                words = words[:index]
                break
        limit = config.max_output_tokens
        if limit is not None and len(words) > limit:
            words, finish = words[:limit], "MAX_TOKENS"
        return _Answer(words, [], finish)

    def _usage(self, request: _Request, answers: list[_Answer], words: int | None = None) -> dict:
        prompt = sum(len(_text_of(c).split()) + 3 for c in request.contents) + self.cached
        if request.system_instruction is not None:
            prompt += len(_text_of(request.system_instruction).split())
        output = sum(len(a.words) + 10 * len(a.calls) for a in answers) if words is None else words
        usage: dict[str, int] = {"promptTokenCount": prompt}
        # Protobuf's JSON leaves zeros out, as Google's answers do.
        if output:
            usage["candidatesTokenCount"] = output
        if self.cached:
            usage["cachedContentTokenCount"] = self.cached
        if self.thoughts:
            usage["thoughtsTokenCount"] = self.thoughts
        usage["totalTokenCount"] = prompt + output + self.thoughts
        return usage

    def _blocked(self, request: _Request) -> dict[str, Any]:
        rating = {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH"}
        return {
            "promptFeedback": {"blockReason": "SAFETY", "safetyRatings": [rating]},
            "usageMetadata": self._usage(request, [], 0),
            "modelVersion": "gemini-mock-001",
        }

    def _whole(self, request: _Request) -> dict[str, Any]:
        answers = self._answers(request)
        if answers[0].finish == "BLOCKED":
            return self._blocked(request)
        candidates = []
        for index, answer in enumerate(answers):
            parts = self._thought_parts()
            if answer.words:
                parts.append({"text": " ".join(answer.words)})
            parts += _call_parts(answer.calls)
            candidates.append(_candidate(index, parts, answer.finish))
        return {
            "candidates": candidates,
            "usageMetadata": self._usage(request, answers),
            "modelVersion": "gemini-mock-001",
            "responseId": f"resp{next(self._counter):04d}",
        }

    def _thought_parts(self) -> list[dict[str, Any]]:
        return [{"text": "Thinking it over.", "thought": True}] if self.thoughts else []

    async def _stream(self, request: _Request, send: Any, receive: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        answers = self._answers(request)
        if answers[0].finish == "BLOCKED":
            events = [_event(self._blocked(request))]
        else:
            events = self._stream_events(request, answers)
        failure, self._stream_error = self._stream_error, None
        if failure is not None:
            status, message, after = failure
            error = {"code": _CODE_OF_STATUS[status], "message": message, "status": status}
            events = [*events[:after], _event({"error": error})]
        cut = self.script.cut_stream_after
        if cut is not None:
            events = events[:cut]
        await send_stream(self.script, receive, send, events)

    def _stream_events(self, request: _Request, answers: list[_Answer]) -> list[bytes]:
        events: list[bytes] = []
        written = 0
        response_id = f"resp{next(self._counter):04d}"

        def chunk(index: int, parts: list[dict[str, Any]], finish: str | None = None) -> bytes:
            body = {
                "candidates": [_candidate(index, parts, finish)],
                "usageMetadata": self._usage(request, answers, written),
                "modelVersion": "gemini-mock-001",
                "responseId": response_id,
            }
            return _event(body)

        for index, answer in enumerate(answers):
            if self.thoughts:
                events.append(chunk(index, self._thought_parts()))
            for number, word in enumerate(answer.words):
                written += 1
                events.append(chunk(index, [{"text": word if number == 0 else " " + word}]))
            for part in _call_parts(answer.calls):
                # Gemini sends each call whole, one event each.
                written += 10
                events.append(chunk(index, [part]))
            events.append(chunk(index, [], answer.finish))
        return events

    async def _embed(self, model: str, method: str, body: bytes, send: Any) -> None:
        if method == "embedContent":
            request = _decode(body, _EmbedRequest)
            if isinstance(request, Failure):
                return await _send_failure(send, request)
            vector = _vector(_text_of(request.content), request.output_dimensionality)
            return await _send(send, 200, msgspec.json.encode({"embedding": {"values": vector}}))
        if method == "batchEmbedContents":
            batch = _decode(body, _BatchEmbedRequest)
            if isinstance(batch, Failure):
                return await _send_failure(send, batch)
            if any(item.model != f"models/{model}" for item in batch.requests):
                message = "* BatchEmbedContentsRequest.model: unexpected model name format"
                return await _send_failure(send, google_error("INVALID_ARGUMENT", message))
            embeddings = [
                {"values": _vector(_text_of(item.content), item.output_dimensionality)}
                for item in batch.requests
            ]
            return await _send(send, 200, msgspec.json.encode({"embeddings": embeddings}))
        predict = _decode(body, _PredictRequest)
        if isinstance(predict, Failure):
            return await _send_failure(send, predict)
        dims = predict.parameters.output_dimensionality if predict.parameters else None
        predictions = [
            {
                "embeddings": {
                    "values": _vector(instance.content, dims),
                    "statistics": {
                        "token_count": len(instance.content.split()),
                        "truncated": False,
                    },
                }
            }
            for instance in predict.instances
        ]
        await _send(send, 200, msgspec.json.encode({"predictions": predictions}))

    # --- Anthropic on Vertex ----------------------------------------------------------------

    async def _vertex_anthropic(
        self, model: str, method: str, headers: dict, body: bytes, send: Any, receive: Any
    ) -> None:
        if method not in ("rawPredict", "streamRawPredict"):
            message = f"Method {method} is not found"
            return await _send_failure(send, google_error("NOT_FOUND", message))
        try:
            fields = msgspec.json.decode(body, type=dict[str, Any])
        except msgspec.DecodeError as exc:
            return await _send_failure(send, google_error("INVALID_ARGUMENT", str(exc)))
        if "model" in fields or fields.pop("anthropic_version", None) != VERTEX_ANTHROPIC_VERSION:
            message = "anthropic_version: vertex-2023-10-16 is required; model is in the URL"
            return await _send_failure(send, google_error("INVALID_ARGUMENT", message))
        if (method == "streamRawPredict") != bool(fields.get("stream")):
            message = "streamRawPredict is for stream: true, rawPredict for the rest"
            return await _send_failure(send, google_error("INVALID_ARGUMENT", message))
        # Vertex's version is the body's: the Messages API underneath gets its own model.
        rewritten = msgspec.json.encode({**fields, "model": model})
        await self.anthropic._messages_call(rewritten, send, receive)


def _decode(body: bytes, kind: type) -> Any:
    try:
        return msgspec.json.decode(body, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        return google_error("INVALID_ARGUMENT", f"Invalid JSON payload received. {exc}")


def _text_of(content: _Content) -> str:
    texts = []
    for part in content.parts:
        if part.text is not None and not part.thought:
            texts.append(part.text)
        elif part.function_response is not None:
            response = part.function_response.response
            output = response.get("output", response)
            texts.append(
                output if isinstance(output, str) else msgspec.json.encode(output).decode()
            )
    return " ".join(texts)


def _words(text: str) -> int:
    return len(text.split())


def _user_text(request: _Request) -> str:
    last = request.contents[-1]
    user = next((c for c in reversed(request.contents) if c.role != "model"), last)
    return _text_of(user)


def _conversation_refusal(request: _Request) -> str | None:
    """What Gemini refuses in a conversation: results that answer no call just before them,
    and (as Gemini 3 does) a model turn's calls sent back without their signature."""
    previous: list[str] = []
    for content in request.contents:
        results = [p.function_response.name for p in content.parts if p.function_response]
        if results and sorted(results) != sorted(previous):
            return (
                "Please ensure that the number of function response parts is equal to the "
                "number of function call parts of the function call turn."
            )
        calls = [p for p in content.parts if p.function_call]
        if content.role == "model" and calls and calls[0].thought_signature != SIGNATURE:
            return (
                f"Function call is missing a thought_signature in functionCall parts. "
                f"This is required for tools to work correctly ({calls[0].function_call.name})."
            )
        previous = [p.function_call.name for p in calls]
    return None


def _call_parts(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    parts = []
    for number, call in enumerate(calls):
        part: dict[str, Any] = {"functionCall": call}
        if number == 0:
            part["thoughtSignature"] = SIGNATURE
        parts.append(part)
    return parts


def _candidate(index: int, parts: list[dict[str, Any]], finish: str | None) -> dict[str, Any]:
    candidate: dict[str, Any] = {}
    if parts:
        candidate["content"] = {"parts": parts, "role": "model"}
    if finish is not None:
        candidate["finishReason"] = finish
        rating = "HIGH" if finish == "SAFETY" else "NEGLIGIBLE"
        candidate["safetyRatings"] = [
            {"category": "HARM_CATEGORY_HARASSMENT", "probability": rating, "blocked": True}
            if rating == "HIGH"
            else {"category": "HARM_CATEGORY_HARASSMENT", "probability": rating}
        ]
    if index:  # protobuf leaves the zero out
        candidate["index"] = index
    return candidate


def _vector(text: str, dims: int | None) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round(digest[i % len(digest)] / 255, 4) for i in range(dims or 8)]


def _event(body: dict[str, Any]) -> bytes:
    # Google frames its events with CRLFs.
    return b"data: " + msgspec.json.encode(body) + b"\r\n\r\n"


async def _send_failure(send: Any, failure: Failure) -> None:
    await _send(send, failure.status, failure.body, failure.headers)


async def _send(send: Any, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    raw_headers = [(b"content-type", b"application/json; charset=UTF-8")]
    raw_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})
