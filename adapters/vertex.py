"""Vertex AI: Google's Gemini models and Anthropic's Claude models in a Google Cloud project.

The URL names the project, the region and the model's publisher:
`{base}/v1/projects/{project}/locations/{location}/publishers/{google|anthropic}/models/{model}`
where `base` is `https://{location}-aiplatform.googleapis.com` (`https://aiplatform.
googleapis.com` for the `global` location). Every call carries a service account's OAuth
access token (`adapters.vertex_auth`).

- Gemini models (`publishers/google`) take the Gemini API's body on `:generateContent` and
  `:streamGenerateContent?alt=sse`: `adapters.gemini`'s adapter with this URL and token.
  Embeddings are Vertex's own `:predict` (`instances` of `content`, a token count per input).
- Anthropic's models (`publishers/anthropic`, a model named `claude…`) take the Messages body
  on `:rawPredict` and `:streamRawPredict`, without `model` (it is in the URL) and with
  `anthropic_version: "vertex-2023-10-16"` in the body instead of the header:
  `adapters.anthropic`'s adapter with this URL, body and token. A client's `anthropic-beta`
  is passed on as a header. Vertex answers its own refusals (quota, permissions) in Google's
  error shape and the model's in Anthropic's; both are read.

The deployment's `api_version` names the URL's version (`v1` unless set, e.g. `v1beta1`).
"""

from __future__ import annotations

import asyncio

import msgspec

from adapters.anthropic import (
    MESSAGES_API,
    AnthropicAdapter,
    anthropic_error_message,
    messages_request,
    native_body,
)
from adapters.gemini import GeminiAdapter, embed_result
from adapters.gemini_errors import ErrorReader, google_error, send_to_google
from adapters.http import UpstreamClient, UpstreamResponse, decode_json, join_url
from adapters.tokens import token_count
from adapters.types import ChatCall, EmbedCall, EmbedResult, Upstream, UpstreamError
from adapters.vertex_auth import AccessTokens

DEFAULT_API_VERSION = "v1"
# The only version of the Messages API that Vertex AI serves, named in the body.
ANTHROPIC_VERSION = "vertex-2023-10-16"
# Inputs one `:predict` call takes: Google's gemini-embedding models take one at a time, its
# text-embedding models up to 250.
_PREDICT_BATCH = 250
_PREDICT_CONCURRENCY = 8


def is_anthropic_model(model: str) -> bool:
    """Whether a Vertex AI model is one of Anthropic's (publisher `anthropic`), by its name."""
    return model.startswith("claude")


def model_url(upstream: Upstream, publisher: str, method: str) -> str:
    location = upstream.location or "global"
    base = upstream.base_url
    if not base:
        host = "aiplatform.googleapis.com"
        base = f"https://{host}" if location == "global" else f"https://{location}-{host}"
    path = (
        f"{upstream.api_version or DEFAULT_API_VERSION}/projects/{upstream.project}"
        f"/locations/{location}/publishers/{publisher}/models/{upstream.model}:{method}"
    )
    return join_url(base, path)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


# --- Gemini on Vertex -------------------------------------------------------------------------


class _PredictInstance(msgspec.Struct):
    content: str


class _PredictParameters(msgspec.Struct, omit_defaults=True, rename="camel"):
    output_dimensionality: int | None = None


class _PredictRequest(msgspec.Struct):
    instances: list[_PredictInstance]
    parameters: _PredictParameters


class _Statistics(msgspec.Struct):
    # Untrusted, read by `token_count`; Vertex's own snake_case.
    token_count: msgspec.Raw = msgspec.Raw(b"null")


class _PredictEmbedding(msgspec.Struct):
    values: list[float] = []
    statistics: _Statistics | None = None


class _Prediction(msgspec.Struct):
    embeddings: _PredictEmbedding | None = None


class _PredictResponse(msgspec.Struct):
    predictions: list[_Prediction] = []


_predict_decoder = msgspec.json.Decoder(_PredictResponse)


class VertexGeminiAdapter(GeminiAdapter):
    """Gemini's body on Vertex AI's URL, with a service account's token."""

    def __init__(self, upstream: Upstream, client: UpstreamClient) -> None:
        super().__init__(upstream, client)
        self.tokens = AccessTokens(upstream.credentials_file, upstream.provider)

    def method_url(self, method: str) -> str:
        return model_url(self.upstream, "google", method)

    async def auth_headers(self) -> dict[str, str]:
        return bearer(await self.tokens.token())

    async def embed(self, call: EmbedCall) -> EmbedResult:
        request = call.request
        texts = request.texts()
        batch = 1 if self.upstream.model.startswith("gemini-embedding") else _PREDICT_BATCH
        # Google's gemini-embedding models take one input a call: a few calls at a time.
        gate = asyncio.Semaphore(_PREDICT_CONCURRENCY)

        async def predict(chunk: list[str]) -> list[_PredictEmbedding]:
            async with gate:
                return await self._predict(chunk, request.dimensions)

        chunks = [texts[start : start + batch] for start in range(0, len(texts), batch)]
        embeddings = [e for answer in await asyncio.gather(*map(predict, chunks)) for e in answer]
        counts = [
            token_count(e.statistics.token_count) if e.statistics else None for e in embeddings
        ]
        tokens = None if None in counts else sum(c or 0 for c in counts)
        return embed_result(self.upstream, call, [e.values for e in embeddings], tokens)

    async def _predict(self, texts: list[str], dimensions: int | None) -> list[_PredictEmbedding]:
        body = _PredictRequest([_PredictInstance(t) for t in texts], _PredictParameters(dimensions))
        response = await self._post("predict", msgspec.json.encode(body))
        answer = decode_json(_predict_decoder, response.content, self.upstream)
        if len(answer.predictions) != len(texts):
            raise UpstreamError(
                502,
                f"{self.upstream.provider} upstream sent {len(answer.predictions)} embeddings "
                f"for {len(texts)} inputs",
                retryable=True,
            )
        return [prediction.embeddings or _PredictEmbedding() for prediction in answer.predictions]


# --- Anthropic on Vertex ----------------------------------------------------------------------


class _VertexErrors(ErrorReader):
    """Vertex's own refusals are Google's error bodies; the model's are Anthropic's."""

    def __call__(self, body: bytes) -> tuple[str, str | None]:
        self.status = google_error(body)
        if self.status is None:
            return anthropic_error_message(body)
        return super().__call__(body)


class VertexAnthropicAdapter(AnthropicAdapter):
    """Anthropic's Messages translation on Vertex AI's `rawPredict`, with a service account's
    token."""

    def __init__(self, upstream: Upstream, client: UpstreamClient) -> None:
        super().__init__(upstream, client)
        self.tokens = AccessTokens(upstream.credentials_file, upstream.provider)

    def url(self, *, stream: bool = False) -> str:
        method = "streamRawPredict" if stream else "rawPredict"
        return model_url(self.upstream, "anthropic", method)

    def body(self, call: ChatCall, *, stream: bool) -> bytes:
        native = call.native_for(MESSAGES_API)
        if native is not None:
            return native_body(
                native, call, self.upstream, stream=stream, vertex_version=ANTHROPIC_VERSION
            )
        body = messages_request(call, self.upstream, stream=stream)
        body.anthropic_version = ANTHROPIC_VERSION
        return msgspec.json.encode(body)

    def headers(self, call: ChatCall) -> dict[str, str]:
        # The version is the body's; only the client's beta features travel as a header.
        beta = call.forward_headers.get("anthropic-beta")
        return {"anthropic-beta": beta} if beta else {}

    async def _send(
        self, url: str, body: bytes, headers: dict[str, str], *, stream: bool
    ) -> UpstreamResponse:
        headers.update(bearer(await self.tokens.token()))
        return await send_to_google(
            self.client, self.upstream, url, body, headers, stream=stream, reader=_VertexErrors()
        )


def vertex_adapter(upstream: Upstream, client: UpstreamClient) -> GeminiAdapter | AnthropicAdapter:
    """The Vertex AI adapter for the deployment's model: Anthropic's or Google's."""
    if is_anthropic_model(upstream.model):
        return VertexAnthropicAdapter(upstream, client)
    return VertexGeminiAdapter(upstream, client)
