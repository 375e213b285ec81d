"""Traces over OTLP/HTTP from real nodes to a collector that decodes OTLP's protobuf: a span
per request after the GenAI semantic conventions (model, tokens, cost), child spans for the
attempts at a deployment and at a peer; nothing at all when no endpoint is configured."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import openai
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from node.config import load_config
from node.observe.tracing import start_tracing
from tests.conftest import NodeDir, run_node
from tests.mocks.script import read_body
from tests.mocks.server import serve_app
from tests.test_federation import LLAMA, cli, invite, make_peer, model_owners, wait_for

HI = [{"role": "user", "content": "hi"}]
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Collector:
    """An OTLP/HTTP trace receiver: every span it was sent, its attributes as plain values."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.resources: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        with self._lock:
            for resource_spans in request.resource_spans:
                self.resources.append(_attributes(resource_spans.resource.attributes))
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(
                            {
                                "name": span.name,
                                "kind": span.kind,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent": span.parent_span_id.hex(),
                                "start": span.start_time_unix_nano,
                                "end": span.end_time_unix_nano,
                                "status": span.status.code,
                                "attributes": _attributes(span.attributes),
                            }
                        )
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/x-protobuf")],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    def requests(self, model: str) -> list[dict[str, Any]]:
        with self._lock:
            return [
                s
                for s in self.spans
                if s["attributes"].get("gen_ai.request.model") == model and s["kind"] == 2
            ]

    def children(self, span: dict[str, Any]) -> list[dict[str, Any]]:
        with self._lock:
            return [s for s in self.spans if s["parent"] == span["span_id"]]


def _attributes(attributes: Any) -> dict[str, Any]:
    found = {}
    for item in attributes:
        value = item.value
        kind = value.WhichOneof("value")
        found[item.key] = getattr(value, kind) if kind else None
    return found


@contextmanager
def collector() -> Iterator[tuple[Collector, str]]:
    sink = Collector()
    with serve_app(sink) as url:
        yield sink, url + "/v1/traces"


def traced(directory: NodeDir, endpoint: str) -> None:
    directory.set_config('otlp_endpoint = ""', f'otlp_endpoint = "{endpoint}"')


BROKEN = '[[models]]\nname = "broken"\nprovider = "openai"\nbase_url = "http://127.0.0.1:9/v1"'


def test_a_span_per_request_with_a_child_per_attempt(node_dir: NodeDir) -> None:
    with collector() as (sink, endpoint):
        traced(node_dir, endpoint)
        node_dir.add_config(BROKEN)
        with run_node(node_dir) as node:
            sdk = openai.OpenAI(base_url=node.url + "/v1", api_key=node.key, max_retries=0)
            raw = sdk.chat.completions.with_raw_response.create(
                model="echo", messages=HI, extra_headers={"traceparent": TRACEPARENT}
            )
            request_id = raw.headers["aihub-request-id"]
            # A malformed trace context is ignored: the request starts a trace of its own.
            stream = sdk.chat.completions.create(
                model="echo",
                messages=HI,
                stream=True,
                extra_headers={"traceparent": "00-" + "z" * 200},
            )
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            sdk.embeddings.create(model="echo-embed", input="hi")
            with suppress(openai.APIStatusError):
                sdk.chat.completions.create(model="broken", messages=HI)
            # Spans are batched: stopping the node sends what is left.
        assert len(sink.requests("echo")) == 2
        span = next(
            s for s in sink.requests("echo") if s["attributes"]["aihub.request_id"] == request_id
        )
        attributes = span["attributes"]
        assert span["name"] == "chat echo" and span["kind"] == 2  # SERVER
        # The caller's trace is continued: its trace id, its span as the parent.
        assert span["trace_id"] == TRACEPARENT.split("-")[1]
        assert span["parent"] == TRACEPARENT.split("-")[2]
        assert attributes["gen_ai.operation.name"] == "chat"
        assert attributes["gen_ai.usage.input_tokens"] > 0
        assert attributes["gen_ai.usage.output_tokens"] > 0
        assert attributes["aihub.cost_micros"] > 0
        assert attributes["gen_ai.provider.name"] == "echo"
        assert attributes["http.response.status_code"] == 200
        assert span["end"] >= span["start"] > 0
        [child] = sink.children(span)
        assert child["kind"] == 3  # CLIENT
        assert child["trace_id"] == span["trace_id"]
        assert child["attributes"]["gen_ai.provider.name"] == "echo"
        assert span["start"] <= child["start"] <= child["end"] <= span["end"]
        [embedding] = sink.requests("echo-embed")
        assert embedding["name"] == "embeddings echo-embed"
        # An upstream that does not answer: the request and each attempt end in error.
        [failed] = sink.requests("broken")
        assert failed["status"] == 2  # ERROR
        assert failed["attributes"]["error.type"] == "502"
        attempts = sink.children(failed)
        assert attempts and all(a["status"] == 2 for a in attempts)
        assert all(a["attributes"]["gen_ai.provider.name"] == "openai" for a in attempts)
        assert sink.resources[0]["service.name"] == "aihub"


def test_a_peer_hop_is_a_child_span(tmp_path: Path) -> None:
    with collector() as (sink, endpoint):
        alice = make_peer(tmp_path, "alice", LLAMA)
        bob = make_peer(tmp_path, "bob")
        traced(bob.dir, endpoint)
        with alice.run(), bob.run() as b:
            cli("join", invite(alice), "--data-dir", str(bob.path))
            assert wait_for(lambda: model_owners(b).get("llama3") == "alice", 20)
            sdk = openai.OpenAI(base_url=b.url + "/v1", api_key=b.key, max_retries=0)
            sdk.chat.completions.create(model="llama3", messages=HI)
        [span] = sink.requests("llama3")
        [child] = sink.children(span)
        assert child["attributes"]["aihub.peer"] == "alice"
        assert child["attributes"]["gen_ai.provider.name"] == "aihub"
        assert span["attributes"]["aihub.deployment"] == "llama3@alice"


def test_no_endpoint_no_tracing(node_dir: NodeDir) -> None:
    config = load_config(node_dir.path)
    assert config.tracing.otlp_endpoint == ""
    assert start_tracing(config, "ed25519:x") is None
    # A node that serves requests without an endpoint never imports OpenTelemetry's SDK.
    script = (
        "import sys, asyncio, httpx\n"
        "from pathlib import Path\n"
        "from node.app import create_app\n"
        "from tests.mocks.server import serve_app\n"
        f"app = create_app(Path({str(node_dir.path)!r}))\n"
        "with serve_app(app, lifespan='on') as url:\n"
        f"    key = {node_dir.key!r}\n"
        "    r = httpx.post(url + '/v1/chat/completions',"
        " headers={'authorization': 'Bearer ' + key},"
        " json={'model': 'echo', 'messages': [{'role': 'user', 'content': 'hi'}]})\n"
        "    assert r.status_code == 200, r.text\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent.parent,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
