"""Numbers from upstreams and peers are untrusted: a token count that is negative, huge
(2^62), not an integer, missing or more than the request could have used never fails an
answer, never reaches the database, a metric or the journal as it is (it is clamped, and the
record says so), and the charge never passes what was reserved. Journal replay skips and
reports a record it cannot apply: the node still starts."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import struct
import subprocess
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from click.testing import CliRunner
from hypothesis import example, given, settings
from hypothesis import strategies as st
from msgspec import Raw

from adapters.anthropic import AnthropicAdapter
from adapters.http import UpstreamClient
from adapters.ollama import OllamaAdapter
from adapters.openai import OpenAIAdapter
from adapters.tokens import MAX_TOKEN_COUNT, token_count
from adapters.types import Upstream, Usage
from node.cli.main import main
from node.config import DATABASE_FILE
from node.gateway.journal import JOURNAL_DIR, Journal
from node.gateway.usage import PROMPT_FACTOR, PROMPT_SLACK, UsageRecorder, clamp_usage
from node.storage import open_store
from node.storage.records import Hold
from tests.calls import chat_call, embed_call, rendered
from tests.conftest import NodeDir, concurrent_client, run_node
from tests.mocks.script import read_body
from tests.mocks.server import free_port, serve_app
from tests.test_budgets import make_key, spend_of
from tests.test_journal import _serve
from tests.test_storage import charge as usage_of

SETTINGS = settings(max_examples=300, deadline=None, database=None)

# Counts as an upstream might write them, as JSON text: none may fail an answer.
BAD = ["-5", "1.5", "12.0", '"12"', "true", "null", "{}", "[1]", "1e400", str(2**62), str(2**70)]


def _good(text: str) -> int | None:
    """The count a JSON text is taken for, if it is one (a non-negative integer)."""
    try:
        value = msgspec.json.decode(text.encode(), type=int)
    except msgspec.DecodeError:
        return None
    return min(value, MAX_TOKEN_COUNT) if value >= 0 else None


# --- the pure parts: reading a count, clamping usage ---------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)


@SETTINGS
@given(value=json_values)
@example(value=2**62)
@example(value=-1)
@example(value=True)
def test_a_count_is_a_non_negative_int_within_bounds_or_none(value: Any) -> None:
    count = token_count(Raw(msgspec.json.encode(value)))
    if type(value) is int and value >= 0:
        assert count == min(value, MAX_TOKEN_COUNT)
    else:
        assert count is None


counts = (
    st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=4)
    | st.booleans()
    | st.none()
)


@SETTINGS
@given(
    prompt=counts,
    completion=counts,
    total=counts,
    worst_prompt=st.integers(0, 10**7),
    worst_completion=st.integers(0, 10**6),
)
@example(prompt=2**62, completion=2**62, total=-1, worst_prompt=10, worst_completion=5)
def test_clamped_usage_is_within_what_the_request_could_use(
    prompt: Any, completion: Any, total: Any, worst_prompt: int, worst_completion: int
) -> None:
    worst = Usage(worst_prompt, worst_completion, worst_prompt + worst_completion)
    usage, clamped = clamp_usage(Usage(prompt, completion, total), worst)
    most_prompt = worst_prompt * PROMPT_FACTOR + PROMPT_SLACK
    assert type(usage.prompt_tokens) is int and 0 <= usage.prompt_tokens <= most_prompt
    assert type(usage.completion_tokens) is int and 0 <= usage.completion_tokens <= worst_completion
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    honest = (
        type(prompt) is int
        and type(completion) is int
        and 0 <= prompt <= most_prompt
        and 0 <= completion <= worst_completion
    )
    # Counts that were possible pass as they are; any other is clamped, and said to be.
    assert clamped is not honest
    if honest:
        assert (usage.prompt_tokens, usage.completion_tokens) == (prompt, completion)


# --- every adapter reads whatever an upstream writes in its counts -------------------------


class Canned:
    """An upstream that answers every request with one canned body."""

    def __init__(self) -> None:
        self.body = b""
        self.content_type = "application/json"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await read_body(receive)
        headers = [(b"content-type", self.content_type.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


@pytest.fixture(scope="module")
def canned() -> Iterator[tuple[Canned, str]]:
    app = Canned()
    with serve_app(app) as url:
        yield app, url


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    async with UpstreamClient() as client:
        yield client


def _sse(*events: str, named: bool = False) -> bytes:
    out = []
    for event in events:
        kind = event.split('"type":"', 1)[1].split('"', 1)[0] if named else None
        out.append((f"event: {kind}\n" if kind else "") + f"data: {event}\n\n")
    return "".join(out).encode()


def _openai_chat(v: str) -> bytes:
    return (
        '{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":'
        '"assistant","content":"hello there"},"finish_reason":"stop"}],'
        f'"usage":{{"prompt_tokens":{v},"completion_tokens":{v},"total_tokens":{v}}}}}'
    ).encode()


def _openai_stream(v: str) -> bytes:
    chunk = '{{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":{}}}'
    return (
        _sse(
            chunk.format('[{"index":0,"delta":{"content":"hello there"}}]'),
            chunk.format('[{"index":0,"delta":{},"finish_reason":"stop"}]'),
            chunk.format("[]")[:-1]
            + f',"usage":{{"prompt_tokens":{v},"completion_tokens":{v},"total_tokens":-3}}}}',
        )
        + b"data: [DONE]\n\n"
    )


def _anthropic_chat(v: str) -> bytes:
    return (
        '{"id":"m","type":"message","role":"assistant","content":[{"type":"text","text":'
        f'"hello there"}}],"stop_reason":"end_turn","usage":{{"input_tokens":{v},'
        f'"output_tokens":{v},"cache_read_input_tokens":{v}}}}}'
    ).encode()


def _anthropic_stream(v: str) -> bytes:
    return _sse(
        '{"type":"message_start","message":{"id":"m","content":[],'
        f'"usage":{{"input_tokens":{v},"output_tokens":{v}}}}}}}',
        '{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}',
        '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hello"}}',
        '{"type":"content_block_stop","index":0}',
        '{"type":"message_delta","delta":{"stop_reason":"end_turn"},'
        f'"usage":{{"output_tokens":{v}}}}}',
        '{"type":"message_stop"}',
        named=True,
    )


def _ollama_chat(v: str) -> bytes:
    return (
        '{"message":{"role":"assistant","content":"hello there"},"done":true,'
        f'"done_reason":"stop","prompt_eval_count":{v},"eval_count":{v}}}'
    ).encode()


def _ollama_stream(v: str) -> bytes:
    return (
        b'{"message":{"role":"assistant","content":"hello"},"done":false}\n'
        + _ollama_chat(v).replace(b'"hello there"', b'""')
        + b"\n"
    )


def _adapter(provider: str, url: str, client: UpstreamClient) -> Any:
    upstream = Upstream(provider=provider, model="m", base_url=url)  # type: ignore[arg-type]
    kind = {"openai": OpenAIAdapter, "anthropic": AnthropicAdapter, "ollama": OllamaAdapter}
    return kind[provider](upstream, client)


def _assert_sane(usage: Usage, estimated: bool, text: str, *, embedding: bool = False) -> None:
    for count in (usage.prompt_tokens, usage.completion_tokens):
        assert type(count) is int and 0 <= count <= 2 * MAX_TOKEN_COUNT
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    good = _good(text)
    if good is None:
        assert estimated
    else:
        assert usage.prompt_tokens >= good
        if not embedding:
            assert usage.completion_tokens == good


CHATS = {
    "openai": (_openai_chat, _openai_stream, "text/event-stream"),
    "anthropic": (_anthropic_chat, _anthropic_stream, "text/event-stream"),
    "ollama": (_ollama_chat, _ollama_stream, "application/x-ndjson"),
}


@pytest.mark.parametrize("provider", sorted(CHATS))
@pytest.mark.parametrize("text", [*BAD, "7"])
async def test_any_count_in_an_answer_is_read_or_estimated(canned, client, provider, text):
    app, url = canned
    plain, streamed, media = CHATS[provider]
    adapter = _adapter(provider, url, client)
    app.body, app.content_type = plain(text), "application/json"
    result = await adapter.chat(chat_call())
    _assert_sane(result.usage, result.usage_estimated, text)
    app.body, app.content_type = streamed(text), media
    stream = await adapter.open_stream(chat_call(stream=True))
    try:
        events = await rendered(stream)
    finally:
        await stream.aclose()
    assert events
    assert stream.usage is not None
    _assert_sane(stream.usage, stream.usage_estimated, text)


@pytest.mark.parametrize("text", [*BAD, "7"])
async def test_any_count_in_embeddings_is_read_or_estimated(canned, client, text):
    app, url = canned
    app.content_type = "application/json"
    app.body = (
        '{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.5]}],'
        f'"model":"m","usage":{{"prompt_tokens":{text},"total_tokens":{text}}}}}'
    ).encode()
    result = await _adapter("openai", url, client).embed(embed_call(input="hi"))
    _assert_sane(result.usage, result.usage_estimated, text, embedding=True)
    app.body = f'{{"embeddings":[[0.5]],"prompt_eval_count":{text}}}'.encode()
    result = await _adapter("ollama", url, client).embed(embed_call(input="hi"))
    _assert_sane(result.usage, result.usage_estimated, text, embedding=True)


# --- through real nodes ----------------------------------------------------------------------

PRICES = "price_in = 1_000_000\nprice_out = 1_000_000"
HUGE = str(2**62)  # at $1/1M in and out, 2^63 micro-units: past SQLite's integers


def _wild_model(node_dir: NodeDir, url: str, name: str = "wild", prices: str = PRICES) -> None:
    node_dir.add_config(
        f'[[models]]\nname = "{name}"\nprovider = "openai"\nmodel = "m"\n'
        f'base_url = "{url}/v1"\n{prices}'
    )


def _rows(node_dir: NodeDir, sql: str, *params: object) -> list[tuple]:
    with sqlite3.connect(node_dir.path / DATABASE_FILE) as db:
        return db.execute(sql, params).fetchall()


def _wait_for(predicate: Any, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    process.send_signal(sig)
    process.wait(timeout=15)


def test_a_node_given_absurd_counts_keeps_writing_usage_and_restarts(
    node_dir: NodeDir, canned, tmp_path: Path
) -> None:
    app, url = canned
    _wild_model(node_dir, url)
    port = free_port()
    process = _serve(node_dir, port, tmp_path / "serve.log")
    try:
        headers = {"authorization": f"Bearer {node_dir.key}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers) as client:
            hi = [{"role": "user", "content": "hello"}]
            app.body, app.content_type = _openai_chat(HUGE), "application/json"
            answer = client.post(
                "/v1/chat/completions", json={"model": "wild", "messages": hi, "max_tokens": 8}
            )
            assert answer.status_code == 200, answer.text
            app.body, app.content_type = _openai_stream(HUGE), "text/event-stream"
            body = {"model": "wild", "messages": hi, "max_tokens": 8, "stream": True}
            assert b"[DONE]" in client.post("/v1/chat/completions", json=body).content
            for _ in range(3):  # ordinary requests after them are recorded as ever
                assert client.post("/v1/chat/completions", json={"model": "echo", "messages": hi})
            count = "SELECT COUNT(*) FROM usage"
            assert _wait_for(lambda: _rows(node_dir, count) == [(5,)]), _rows(node_dir, count)
            metrics = client.get("/metrics").text
        wild = _rows(
            node_dir,
            "SELECT tokens_in, tokens_out, cost_micros, unbilled_micros, clamped FROM usage"
            " WHERE model = 'wild'",
        )
        assert len(wild) == 2
        for tokens_in, tokens_out, cost, unbilled, clamped in wild:
            assert clamped == 1
            assert tokens_out == 8  # max_tokens
            assert 0 < tokens_in <= 9 * PROMPT_FACTOR + PROMPT_SLACK  # "hello" + framing
            assert cost <= 9 + 8  # never more than was reserved: 9 prompt + 8 out, at $1/1M
            assert unbilled == tokens_in + tokens_out - cost
        assert 'aihub_usage_clamped_total{model="wild"} 2.0' in metrics
        report = msgspec.json.decode(
            CliRunner()
            .invoke(main, ["usage", "--by", "model", "--json", "--data-dir", str(node_dir.path)])
            .output
        )
        (by_wild,) = [row for row in report["data"] if row["group"] == "wild"]
        assert by_wild["clamped"] == 2
        assert by_wild["unbilled_micros"] == sum(row[3] for row in wild)
        tokens_out = 'aihub_tokens_total{direction="out",model="wild"} 16.0'
        assert tokens_out in metrics
        _stop(process, signal.SIGKILL)
        process = _serve(node_dir, port, tmp_path / "restarted.log")  # starts cleanly
        assert _rows(node_dir, "SELECT COUNT(*) FROM usage") == [(5,)]
    finally:
        if process.poll() is None:
            _stop(process)


def _frame(payload: bytes) -> bytes:
    return struct.pack("<II", len(payload), zlib.crc32(payload)) + payload


def test_replay_skips_and_reports_what_it_cannot_apply_and_the_node_starts(
    node_dir: NodeDir, tmp_path: Path
) -> None:
    """A journal left by a crash holds a record the database refuses (a cost past SQLite's
    integers, as a version that trusted an upstream's counts wrote) and a whole frame that
    does not decode: the node starts, the good records are written, the others reported."""
    folder = node_dir.path / JOURNAL_DIR
    journal = Journal(folder)
    good = usage_of("good-1", 5, [Hold("key:k", 0, 5)])
    journal.append(good)
    journal.append(usage_of("absurd", 2**64 - 1, [Hold("key:k", 0, 5)]))
    os.write(journal._fd, _frame(b"\xc1"))  # a checksum that holds over no Charge
    journal.append(usage_of("good-2", 7, []))
    (path,) = folder.glob("*.journal")
    port = free_port()
    process = _serve(node_dir, port, tmp_path / "serve.log")
    try:
        ids = _rows(node_dir, "SELECT request_id FROM usage ORDER BY request_id")
        assert ids == [("good-1",), ("good-2",)]
        (event,) = _rows(
            node_dir, "SELECT target, detail FROM audit WHERE action = ?", "usage.skipped"
        )
        detail = msgspec.json.decode(event[1])
        assert event[0] == "journal" and detail["records"] == 2 and detail["ids"] == "absurd"
        assert not path.exists()  # (the serving node has a segment of its own)
        assert path.with_suffix(".rejected").exists()  # kept for a human to look at
    finally:
        _stop(process)
    log = (tmp_path / "serve.log").read_text()
    assert "skipped usage record absurd" in log and "2 records could not be applied" in log


def test_the_charge_never_passes_the_reservation_under_concurrency(
    node_dir: NodeDir, canned
) -> None:
    """Every upstream answer says it used far more prompt tokens than the request could be
    estimated at (300 for "hello"): the budget still never passes its cap. Each charge is
    capped at its reservation, and the record keeps what the answer really cost beside it."""
    app, url = canned
    app.body, app.content_type = (
        _openai_chat("300").replace(b'"completion_tokens":300', b'"completion_tokens":5'),
        "application/json",
    )
    _wild_model(node_dir, url, "dear", "price_in = 10_000_000\nprice_out = 1_000_000")
    cap = 2_000  # one answer really costs 300 * 10 + 5 = 3,005
    key, key_id = make_key(node_dir.path, name="capped", budget_micros=cap)
    body = {"model": "dear", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}

    async def wave(url: str) -> list[httpx.Response]:
        async with concurrent_client(url, 100) as client:
            headers = {"authorization": f"Bearer {key}"}
            return await asyncio.gather(
                *(
                    client.post("/v1/chat/completions", json=body, headers=headers)
                    for _ in range(200)
                )
            )

    charged, served = 0, []
    with run_node(node_dir) as node:
        while not served or served[-1]:
            responses = asyncio.run(wave(node.url))
            assert {r.status_code for r in responses} <= {200, 429}
            ok = [r for r in responses if r.status_code == 200]
            charged += sum(int(r.headers["aihub-cost-micros"]) for r in ok)
            served.append(len(ok))
            assert len(served) < 30
    spent, reserved = spend_of(node_dir.path, f"key:{key_id}")
    assert spent == charged <= cap and reserved == 0
    assert sum(served) > 1
    rows = _rows(
        node_dir,
        "SELECT tokens_in, tokens_out, cost_micros, unbilled_micros, clamped FROM usage"
        " WHERE key_id = ? AND status = 200",
        key_id,
    )
    assert len(rows) == sum(served)
    for tokens_in, tokens_out, cost, unbilled, clamped in rows:
        assert (tokens_in, tokens_out, clamped) == (300, 5, 0)  # possible, so not clamped
        assert cost + unbilled == 3_005 and 0 < cost < 3_005


async def test_one_record_the_database_refuses_never_stops_the_writes_after_it(
    tmp_path: Path,
) -> None:
    """The usage writer meets a record the database cannot hold (written by any path that
    did not clamp): it is skipped and reported, and the records around it are written."""
    store = await open_store(tmp_path / "db")
    recorder = UsageRecorder(store, Journal(tmp_path / JOURNAL_DIR))
    try:
        for request_id, cost in (("before", 3), ("absurd", 2**64 - 1), ("after", 4)):
            recorder.record(usage_of(request_id, cost))
        await recorder.flush()
        recorder.record(usage_of("later", 5))
        await recorder.flush()
        written = {u.request_id for u in await store.usage.usage_since(0)}
        assert written == {"before", "after", "later"}
        (event,) = await store.audit.audit(action="usage.skipped")
        assert event.target == "usage-writer" and event.detail["ids"] == "absurd"
    finally:
        await recorder.stop()
        await store.close()
