"""What the typed seam between adapters and ingress costs, per stream event and per answer.

    taskset -c 0 .venv/bin/python -m bench.seam [--old REV] [--rounds N]

Each figure runs an adapter on a canned upstream answer (no network: the adapter's `send` is
replaced by one that answers from memory, so what is timed is the adapter's own work and the
OpenAI renderer's) and divides by the events (or answers) handled:

- **pass-through**: an OpenAI-compatible upstream's stream, each chunk peeked at and passed on
  (new: wrapped in an `OpenAIChunk` and rendered, which hands back its bytes);
- **decode + render**: the same chunks decoded into neutral events (`OpenAIChunk.events`) and
  rendered back into chunks, what a non-OpenAI ingress's decode costs plus an OpenAI render;
- **anthropic → openai**: an Anthropic Messages stream translated (old: into chunk bytes in the
  adapter; new: into neutral events, then rendered) and the same for a complete answer;
- **ollama → openai**: the same for Ollama's NDJSON lines.

"old" is the adapters as they were at `--old` (default: the commit before the seam), copied
from git into a temporary package; "new" is this checkout. The figures are CPU time of this
process (not wall time), the median over rounds and its min..max; each round runs every
figure's old and new side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from types import ModuleType
from typing import Any

# "layout: node/ in folders per concern", the last commit before the seam.
OLD_REV = "9cad85876a092002623c64b04dde61e15eb1caa4"
EVENTS = 200  # text chunks per canned stream
ROOT = Path(__file__).resolve().parent.parent

# --- canned upstream answers ----------------------------------------------------------------------


def _sse(data: bytes, event: bytes | None = None) -> bytes:
    return (b"event: " + event + b"\n" if event else b"") + b"data: " + data + b"\n\n"


def openai_stream(events: int) -> list[bytes]:
    """A stream as OpenAI sends it: role, text chunks, finish, usage, [DONE]."""

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        body = {
            "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
            "object": "chat.completion.chunk",
            "created": 1741569952,
            "model": "gpt-4o-2024-08-06",
            "service_tier": "default",
            "system_fingerprint": "fp_f9f4fb6dbf",
            "choices": choices,
            **extra,
        }
        return _sse(json.dumps(body, separators=(",", ":")).encode())

    def choice(delta: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

    pieces = [chunk(choice({"role": "assistant", "content": "", "refusal": None}))]
    pieces += [chunk(choice({"content": f" word{i}"})) for i in range(events)]
    pieces.append(chunk(choice({}, "stop")))
    usage = {"prompt_tokens": 12, "completion_tokens": events, "total_tokens": 12 + events}
    pieces.append(chunk([], usage=usage))
    pieces.append(b"data: [DONE]\n\n")
    return pieces


def anthropic_stream(events: int) -> list[bytes]:
    """A stream as Anthropic sends it: message_start, one text block, message_delta/stop."""

    def event(kind: str, **fields: Any) -> bytes:
        data = json.dumps({"type": kind, **fields}, separators=(",", ":")).encode()
        return _sse(data, kind.encode())

    message = {
        "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [],
        "stop_reason": None,
        "usage": {"input_tokens": 25, "output_tokens": 1},
    }
    pieces = [event("message_start", message=message)]
    pieces.append(event("content_block_start", index=0, content_block={"type": "text", "text": ""}))
    pieces.append(event("ping"))
    delta = {"type": "text_delta", "text": ""}
    for i in range(events):
        delta["text"] = f" word{i}"
        pieces.append(event("content_block_delta", index=0, delta=delta))
    pieces.append(event("content_block_stop", index=0))
    pieces.append(
        event("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": events})
    )
    pieces.append(event("message_stop"))
    return pieces


def ollama_stream(events: int) -> list[bytes]:
    def line(body: dict[str, Any]) -> bytes:
        return json.dumps(body, separators=(",", ":")).encode() + b"\n"

    base = {"model": "llama3.2", "created_at": "2026-12-01T12:00:00.000000Z"}
    pieces = [
        line({**base, "message": {"role": "assistant", "content": f" word{i}"}, "done": False})
        for i in range(events)
    ]
    pieces.append(
        line(
            {
                **base,
                "message": {"role": "assistant", "content": ""},
                "done": True,
                "done_reason": "stop",
                "prompt_eval_count": 26,
                "eval_count": events,
            }
        )
    )
    return pieces


OPENAI_ANSWER = json.dumps(
    {
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion",
        "created": 1741570283,
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "word " * 200, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 200, "total_tokens": 212},
        "service_tier": "default",
        "system_fingerprint": "fp_fc9f1d7035",
    }
).encode()

ANTHROPIC_ANSWER = json.dumps(
    {
        "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": "word " * 200}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 25, "output_tokens": 200},
    }
).encode()


ANTHROPIC_TOOLS = [
    _sse(json.dumps(event).encode(), event["type"].encode())
    for event in (
        {"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 9}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": "A"}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "content_block_start",
            "index": 1,
            "content_block": {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}},
        },
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta"}},
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": '{"a": 1}'},
        },
        {"type": "content_block_stop", "index": 1},
        {"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use"}},
        {"type": "content_block_stop", "index": 2},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {}},
        {"type": "message_stop"},
    )
]
OLLAMA_TOOLS = [
    json.dumps(
        {
            "message": {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"function": {"name": "f", "arguments": {"a": 1}}},
                    {"id": "c2", "function": {"name": "g", "arguments": {}}},
                ],
            },
            "done": True,
            "eval_count": 3,
        }
    ).encode()
    + b"\n"
]


class CannedResponse:
    """An `UpstreamResponse` answered from memory: the body whole, or piece by piece."""

    status_code = 200
    headers: dict[str, str] = {}

    def __init__(self, pieces: list[bytes]) -> None:
        self._pieces = pieces
        self.content = b"".join(pieces)

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        for piece in self._pieces:
            yield piece

    def complete(self) -> None:
        return None  # nothing to read on closing: the body was all in memory

    async def aclose(self) -> None:
        return None


# --- the two versions of the adapters ---------------------------------------------------------


def old_adapters(rev: str, folder: Path) -> str:
    """The adapters at `rev`, copied into `folder` as the package `old_adapters`."""
    package = folder / "old_adapters"
    package.mkdir()
    listing = _git("ls-tree", "--name-only", f"{rev}:adapters")
    for name in listing.split():
        if name.endswith(".py"):
            source = _git("show", f"{rev}:adapters/{name}")
            source = source.replace("from adapters.", "from old_adapters.")
            source = source.replace("import adapters.", "import old_adapters.")
            (package / name).write_text(source)
    sys.path.insert(0, str(folder))
    return "old_adapters"


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout


class Version:
    """One version of the adapters, with what the OpenAI ingress does with their output."""

    def __init__(self, package: str, *, new: bool) -> None:
        self.new = new
        self.types = importlib.import_module(f"{package}.types")
        self.openai = importlib.import_module(f"{package}.openai")
        self.anthropic = importlib.import_module(f"{package}.anthropic")
        self.ollama = importlib.import_module(f"{package}.ollama")
        if new:
            from node.ingress.openai_render import ChunkRenderer, result_body

            self._renderer, self._body = ChunkRenderer, result_body

    def call(self, stream: bool) -> Any:
        import msgspec

        body = msgspec.json.encode(
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        )
        request = msgspec.json.decode(body, type=self.types.ChatRequest)
        raw = msgspec.json.decode(body, type=dict[str, msgspec.Raw])
        return self.types.ChatCall(request, raw, "req-bench")

    def upstream(self, provider: str) -> Any:
        return self.types.Upstream(provider=provider, model="m", base_url="http://mock")

    def adapter(
        self, module: ModuleType, provider: str, stream: list[bytes], answer: bytes = b""
    ) -> Any:
        """The provider's adapter, its `send` answering `stream` to a stream, else `answer`."""

        async def send(*_: Any, stream: bool = False, **__: Any) -> CannedResponse:
            return CannedResponse(pieces if stream else [answer])

        pieces = stream
        module.send = send  # type: ignore[attr-defined]
        name = {"openai": "OpenAIAdapter", "anthropic": "AnthropicAdapter"}.get(provider)
        return getattr(module, name or "OllamaAdapter")(self.upstream(provider), None)

    async def relay(self, adapter: Any) -> int:
        """Iterate a stream as the ingress does, rendering each event; the events yielded."""
        stream = await adapter.open_stream(self.call(True))
        count = 0
        if self.new:
            render = self._renderer().render
            async for event in stream:
                render(event)
                count += 1
        else:
            async for _ in stream:
                count += 1
        return count

    async def sent(self, adapter: Any) -> list[bytes]:
        """What an OpenAI client gets for a stream: the events' bytes."""
        stream = await adapter.open_stream(self.call(True))
        if not self.new:
            return [event async for event in stream]
        render = self._renderer().render
        return [render(event) async for event in stream]

    async def answer(self, adapter: Any) -> bytes:
        result = await adapter.chat(self.call(False))
        return self._body(result) if self.new else result.body


async def _decode_render(version: Version, adapter: Any) -> int:
    """The new pass-through stream, each chunk decoded to neutral events and rendered."""
    stream = await adapter.open_stream(version.call(True))
    render = version._renderer().render
    count = 0
    async for chunk in stream:
        for event in chunk.events():
            render(event)
        count += 1
    return count


# --- timing -----------------------------------------------------------------------------------


def _time(run: Callable[[], Coroutine[Any, Any, int]], repeat: int) -> float:
    """CPU microseconds per unit (event or answer) over `repeat` runs: this process's CPU
    time, so that another process on the same core does not count (the machine is shared)."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(run())  # warm up
        units = 0
        start = time.process_time_ns()
        for _ in range(repeat):
            units += loop.run_until_complete(run())
        return (time.process_time_ns() - start) / units / 1000
    finally:
        # A stream left at `[DONE]` leaves its SSE parser to the garbage collector, whose
        # finalizer schedules the parser's close on this loop: let those run before it closes.
        gc.collect()
        loop.run_until_complete(asyncio.sleep(0))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


_CREATED = re.compile(rb'"created":\d+')


def check_same_bytes(old: Version, new: Version) -> None:
    """Before any timing: old and new send an OpenAI client the same bytes (the creation
    time aside, which is the clock's) for every canned stream and answer."""
    streams = [
        ("openai", openai_stream(5)),
        ("anthropic", anthropic_stream(5)),
        ("anthropic", ANTHROPIC_TOOLS),
        ("ollama", ollama_stream(5)),
        ("ollama", OLLAMA_TOOLS),
    ]
    answers = {"openai": OPENAI_ANSWER, "anthropic": ANTHROPIC_ANSWER}
    loop = asyncio.new_event_loop()
    try:
        for provider, pieces in streams:
            sent = []
            for version in (old, new):
                module = getattr(version, provider)
                adapter = version.adapter(module, provider, pieces, answers.get(provider, b""))
                events = loop.run_until_complete(version.sent(adapter))
                if provider in answers:
                    events.append(loop.run_until_complete(version.answer(adapter)))
                sent.append([_CREATED.sub(b'"created":0', event) for event in events])
            if sent[0] != sent[1]:
                raise SystemExit(f"{provider}: old and new send different bytes")
    finally:
        gc.collect()
        loop.run_until_complete(asyncio.sleep(0))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _cases(old: Version, new: Version) -> list[tuple[str, str, Callable[[], Any]]]:
    cases: list[tuple[str, str, Callable[[], Any]]] = []
    streams = {
        "openai": openai_stream(EVENTS),
        "anthropic": anthropic_stream(EVENTS),
        "ollama": ollama_stream(EVENTS),
    }
    answers = {"openai": OPENAI_ANSWER, "anthropic": ANTHROPIC_ANSWER}
    for label, version in (("old", old), ("new", new)):
        adapters = {
            provider: version.adapter(
                getattr(version, provider), provider, pieces, answers.get(provider, b"")
            )
            for provider, pieces in streams.items()
        }
        for provider, adapter in adapters.items():
            what = "pass-through" if provider == "openai" else f"{provider} → openai"
            cases.append((f"stream event: {what}", label, _bind(version.relay, adapter)))
        for provider in answers:
            what = "pass-through" if provider == "openai" else f"{provider} → openai"
            run = _bind(_one(version.answer), adapters[provider])
            cases.append((f"answer: {what}", label, run))
    adapter = new.adapter(new.openai, "openai", streams["openai"], OPENAI_ANSWER)
    cases.append(
        ("stream event: openai decode + render", "new", _bind(_bind2(_decode_render, new), adapter))
    )
    # Each figure's old and new side by side in a round, so that both see the same machine.
    order = list(dict.fromkeys(name for name, _, _ in cases))
    return sorted(cases, key=lambda case: (order.index(case[0]), case[1] != "old"))


def _bind(function: Callable[[Any], Any], argument: Any) -> Callable[[], Any]:
    return lambda: function(argument)


def _bind2(function: Callable[[Any, Any], Any], first: Any) -> Callable[[Any], Any]:
    return lambda second: function(first, second)


def _one(answer: Callable[[Any], Coroutine[Any, Any, bytes]]) -> Callable[[Any], Any]:
    async def run(adapter: Any) -> int:
        await answer(adapter)
        return 1

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default=OLD_REV, help="the git revision of the old adapters")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--repeat", type=int, default=200, help="streams/answers per round")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as folder:
        old = Version(old_adapters(args.old, Path(folder)), new=False)
        new = Version("adapters", new=True)
        check_same_bytes(old, new)
        cases = _cases(old, new)
        figures: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for name, label, run in cases:
                repeat = args.repeat if name.startswith("stream") else args.repeat * 20
                figures.setdefault((name, label), []).append(_time(run, repeat))
    names = list(dict.fromkeys(name for name, _, _ in cases))
    print(
        f"{'µs per unit, median (min..max) of ' + str(args.rounds) + ' rounds':<44}"
        f"{'old':>24}{'new':>24}"
    )
    for name in names:
        row = f"{name:<44}"
        for label in ("old", "new"):
            values = figures.get((name, label))
            if values is None:
                row += f"{'—':>24}"
            else:
                cell = f"{statistics.median(values):.2f} ({min(values):.2f}..{max(values):.2f})"
                row += f"{cell:>24}"
        print(row)


if __name__ == "__main__":
    main()
