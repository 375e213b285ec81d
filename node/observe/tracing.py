"""Traces over OTLP, following OpenTelemetry's GenAI semantic conventions: a span for each
request the node answers (`chat echo`: the model, its tokens, its cost, how it ended), and a
child span for each attempt at a deployment or a peer (`gen_ai.provider.name`, the upstream's
model). The pipeline hands over a settled request's `RequestTrace`; the spans are made here,
with the times it recorded, and exported in batches off the request path.

With no `[tracing] otlp_endpoint` nothing of OpenTelemetry is imported and the pipeline makes
no trace at all (`Hub.tracing` is None).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from node import __version__
from node.config import Config
from node.gateway.traces import AttemptTrace, RequestTrace

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("aihub.tracing")

# gen_ai.operation.name per kind of request.
OPERATIONS = {
    "chat": "chat",
    "embeddings": "embeddings",
    "completions": "text_completion",
    "images": "generate_content",
}


class Tracing:
    """Spans from settled requests, exported over OTLP/HTTP in batches."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._provider = provider
        self._tracer = provider.get_tracer("aihub", __version__)
        self._kinds = SpanKind
        self._status = (Status, StatusCode)
        self._propagator = TraceContextTextMapPropagator()

    def record(self, trace: RequestTrace) -> None:
        try:
            self._record(trace)
        except Exception:  # a trace must never fail a request
            log.exception("tracing request %s failed", trace.request_id)

    def _record(self, trace: RequestTrace) -> None:
        from opentelemetry import trace as otel

        operation = OPERATIONS.get(trace.kind, trace.kind)
        # A caller's W3C trace context is continued (a malformed one is ignored: a new trace).
        caller = (
            self._propagator.extract({"traceparent": trace.traceparent})
            if (trace.traceparent)
            else None
        )
        span = self._tracer.start_span(
            f"{operation} {trace.model}",
            context=caller,
            kind=self._kinds.SERVER,
            start_time=trace.start_ns,
            attributes=request_attributes(trace, operation),
        )
        self._end(span, trace.status, trace.error, trace.end_ns)
        parent = otel.set_span_in_context(span)
        for attempt in trace.attempts:
            child = self._tracer.start_span(
                f"{operation} {attempt.upstream_model}",
                context=parent,
                kind=self._kinds.CLIENT,
                start_time=attempt.start_ns,
                attributes=attempt_attributes(attempt, operation),
            )
            # A stream's attempt lasts until its last event: the request's end.
            end = trace.end_ns if trace.stream and attempt.status == 200 else attempt.end_ns
            self._end(child, attempt.status, attempt.error, end)

    def _end(self, span: Any, status: int, error: str | None, end_ns: int) -> None:
        status_type, code = self._status
        if status >= 400 or status == 0:
            span.set_attribute("error.type", "no_answer" if status == 0 else str(status))
            span.set_status(status_type(code.ERROR, (error or "")[:200] or None))
        span.end(end_time=end_ns)

    def shutdown(self) -> None:
        """Send what is batched, then stop."""
        self._provider.shutdown()


def request_attributes(trace: RequestTrace, operation: str) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.request.model": trace.model,
        "gen_ai.usage.input_tokens": trace.tokens_in,
        "gen_ai.usage.output_tokens": trace.tokens_out,
        "http.response.status_code": trace.status,
        "aihub.request_id": trace.request_id,
        "aihub.key_id": trace.key_id,
        "aihub.cost_micros": trace.cost_micros,
        "aihub.stream": trace.stream,
        "aihub.for_peer": trace.for_peer,
    }
    served = [a for a in trace.attempts if a.status == 200]
    if served:
        attributes["gen_ai.response.model"] = served[-1].upstream_model
        attributes["gen_ai.provider.name"] = served[-1].provider
        attributes["aihub.deployment"] = served[-1].deployment
    return attributes


def attempt_attributes(attempt: AttemptTrace, operation: str) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": attempt.provider,
        "gen_ai.request.model": attempt.upstream_model,
        "aihub.deployment": attempt.deployment,
        "http.response.status_code": attempt.status,
    }
    if attempt.peer is not None:
        attributes["aihub.peer"] = attempt.peer
    return attributes


def start_tracing(config: Config, node_id: str) -> Tracing | None:
    """Tracing to the configured OTLP endpoint, or None (and no import) when there is none."""
    endpoint = config.tracing.otlp_endpoint
    if not endpoint:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise RuntimeError(
            "[tracing] otlp_endpoint is set, but OpenTelemetry is not installed: "
            "pip install 'aihub[otel]'"
        ) from exc
    resource = Resource.create(
        {
            "service.name": config.tracing.service_name,
            "service.version": __version__,
            "service.instance.id": node_id,
            "aihub.node.name": config.node.name,
        }
    )
    # Its own provider, not the process-global one: the app holds it, as it holds the rest.
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return Tracing(provider)
