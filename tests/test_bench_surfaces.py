"""The benchmark's requests for each API surface (bench/surfaces.py) against a real node and the
benchmark's own mock: each is answered, and each stream has exactly the events the benchmark
expects (its "events lost" figure counts against that number)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.loadgen import StreamClient, Target
from bench.surfaces import SURFACES, body
from tests.conftest import NodeDir, RunningNode, run_node
from tests.mocks.server import free_port

CHUNKS = 8
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mock_url() -> Iterator[str]:
    port = free_port()
    command = [sys.executable, "-m", "bench.mock", "--port", str(port), "--chunks", str(CHUNKS)]
    command += ["--chunk-gap-ms", "0"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert "mock upstream on" in process.stdout.readline()  # printed once it listens
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def node(
    node_dir: NodeDir, mock_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[RunningNode]:
    monkeypatch.setenv("BENCH_UPSTREAM_KEY", "sk-bench-upstream")
    node_dir.add_config(
        f"""[[models]]
name = "mock"
provider = "openai"
model = "mock-model"
base_url = "{mock_url}"
api_key_env = "BENCH_UPSTREAM_KEY"
"""
    )
    with run_node(node_dir) as running:
        yield running


def _target(node: RunningNode, surface: str, *, stream: bool) -> Target:
    url = httpx.URL(node.url)
    api = SURFACES[surface]
    request = body(surface, "mock", stream=stream)  # type: ignore[arg-type]
    return Target(surface, url.host, url.port or 80, api.path, request, api.headers(node.key))


@pytest.mark.parametrize("surface", list(SURFACES))
def test_answer_has_the_surfaces_marker(node: RunningNode, surface: str) -> None:
    target = _target(node, surface, stream=False)
    answer = httpx.post(target.url, content=target.body, headers=target.headers, timeout=30)
    assert answer.status_code == 200, answer.text
    assert SURFACES[surface].marker in answer.content


@pytest.mark.parametrize("surface", list(SURFACES))
def test_stream_has_the_expected_events(node: RunningNode, surface: str) -> None:
    target = _target(node, surface, stream=True)
    client = StreamClient(target.host, target.port)
    try:
        timing = client.stream(target.request())
    finally:
        client.close()
    assert timing.status == 200
    assert timing.events == CHUNKS + SURFACES[surface].stream_events
