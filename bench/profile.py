"""Summarise a py-spy profile (`py-spy record -f raw`: one collapsed stack per line, then its
sample count) of the node into costs per request.

Samples where the process only waits are dropped: the event loop's own frame (uvloop runs in C,
so a thread blocked in epoll shows as `Runner.run`) and the store's thread waiting on its
queue. The rest is split two ways, each share turned into microseconds per request with the
CPU time per request measured over the same window:

- by layer, from the file of the innermost Python frame (self time): ASGI server, framework,
  HTTP client, SQLite, the node's own code…;
- by step of the request, inclusive: the node functions a request passes through.
"""

from __future__ import annotations

from collections import Counter

IDLE = (
    "Runner.run (asyncio/runners.py",
    "run (uvloop/__init__.py",
    # aiosqlite's thread (node/storage/sqlite/connection.py) waiting for a job: its SQL runs
    # in the frames of the work it is handed.
    "_connection_worker_thread (aiosqlite/core.py",
    "Thread.wait (threading.py",
    "Condition.wait (threading.py",
    "_worker (concurrent/futures/thread.py",
)

# (layer, path fragments): the first match wins, so the more specific come first.
LAYERS = [
    ("HTTP client: httpx layer", ("httpx/", "httpx_aiohttp/")),
    # adapters/aiohttp_post.py does a part of aiohttp's work (the request's write, the
    # answer handed over) with aiohttp's own pieces: counted with it, as before it did that.
    (
        "HTTP client: aiohttp",
        ("aiohttp/", "yarl/", "multidict/", "aiohappyeyeballs/", "adapters/aiohttp_post.py"),
    ),
    ("ASGI server: uvicorn", ("uvicorn/", "httptools/")),
    ("ASGI server: granian", ("granian/",)),
    ("framework: Litestar", ("litestar/",)),
    (
        "SQLite: aiosqlite + sqlite3",
        ("aiosqlite/", "node/storage/sqlite/connection.py", "sqlite3/"),
    ),
    ("node: auth (keys)", ("node/gateway/auth.py", "node/gateway/keys.py", "node/peers/auth.py")),
    ("node: rate limits", ("node/gateway/ratelimit.py",)),
    (
        "node: budgets + storage",
        ("node/gateway/budgets.py", "node/storage/", "node/gateway/policy.py"),
    ),
    ("node: usage writer", ("node/gateway/usage.py",)),
    ("node: metrics", ("node/gateway/metrics.py", "prometheus_client/")),
    (
        "node: request path (ingress + pipeline)",
        (
            "node/ingress/openai.py",
            "node/ingress/asgi.py",
            "node/ingress/errors.py",
            "node/gateway/pipeline.py",
            "node/gateway/accounting.py",
            "node/errors.py",
            "federation/ids.py",
        ),
    ),
    ("node: Responses surface (decode, render)", ("node/ingress/responses",)),
    ("node: Messages surface (decode, render)", ("node/ingress/anthropic",)),
    ("node: router", ("node/gateway/router.py",)),
    ("node: other", ("node/",)),
    ("adapters", ("adapters/",)),
    ("federation + ledger", ("federation/", "ledger/", "nacl/")),
    ("logging", ("logging/",)),
    ("scheduler: apscheduler", ("apscheduler/",)),
    ("asyncio (tasks, futures)", ("asyncio/",)),
    ("anyio", ("anyio/",)),
]

# Steps of a request: a function name (as py-spy prints it, without the file, or with a part
# of its path after " (" where two modules share the name) and its label. "a - b" counts the
# stacks through a that do not pass through b: a step's own part where b, nested in it, is
# shown as a step of its own.
STEPS = [
    ("HttpToolsProtocol.data_received", "uvicorn: reading and parsing requests (httptools)"),
    ("RequestResponseCycle.run_asgi", "request task: uvicorn -> Litestar -> handler"),
    ("_chat", "  handler: chat completions"),
    ("_responses (node/ingress/responses.py", "  handler: Responses API"),
    ("_messages (node/ingress/anthropic.py", "  handler: Anthropic Messages API"),
    ("authenticate", "    authenticate (key from memory, epoch stat)"),
    ("read_body", "    read body (+ peer signature check)"),
    ("decode_body", "    decode body (msgspec, twice)"),
    ("begin", "    admit: model check, plan, limits, budget"),
    ("RateLimiter.admit", "      rate limiter"),
    ("Budgets.reserve", "      budget reservation (from the lease; the database to refill it)"),
    ("_route", "    route: the upstream call, cancelled if the client goes"),
    ("Router.run", "      router + adapter"),
    ("OpenAIAdapter.chat", "        OpenAI adapter: chat call"),
    ("_open", "        open a stream: the upstream call to its first event"),
    ("OpenAIAdapter.open_stream", "          OpenAI adapter: the stream's request and head"),
    ("complete - _route", "    answer: settle, receipts (complete, less its route)"),
    ("Accounting.finish", "      finish: usage record (journal), metrics, release"),
    ("Accounting.issue_receipt", "      our receipt for a peer (one transaction)"),
    ("complete_response", "    render: a Responses `response`"),
    ("message_body", "    render: an Anthropic `message`"),
    ("_send_reply", "  sending the answer"),
    ("_send_stream", "  sending a stream"),
    ("_relay", "    the relay: the upstream's events on (read, parse, account)"),
    ("_settle_stream", "      settle the stream: usage record, metrics, release"),
    ("UsageRecorder._run", "usage writer task (batched, every 50 ms)"),
    ("_connection_worker_thread", "the store's thread (aiosqlite, running SQL)"),
]


def _function(frame: str) -> str:
    return frame.split(" (", 1)[0]


def _layer(frame: str) -> str:
    where = frame.rsplit("(", 1)[-1]
    for name, fragments in LAYERS:
        if any(fragment in where for fragment in fragments):
            return name
    return "other (stdlib, C calls from Python)"


def _passes(step: str, names: set[str], frames: list[str]) -> bool:
    """Whether a stack passes through `step` (see STEPS)."""
    step, _, unless = step.partition(" - ")
    if unless and _passes(unless, names, frames):
        return False
    function, _, where = step.partition(" (")
    if where:
        return any(_function(frame) == function and where in frame for frame in frames)
    return function in names or any(name.startswith(function) for name in names)


def summarise(raw: str, cpu_us_per_request: float, top: int = 25) -> dict[str, object]:
    layers: Counter[str] = Counter()
    steps: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    active = idle = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        leaf = frames[-1]
        if leaf.startswith(IDLE):
            idle += count
            continue
        active += count
        layers[_layer(leaf)] += count
        leaves[leaf] += count
        names = {_function(frame) for frame in frames}
        for step, _label in STEPS:
            if _passes(step, names, frames):
                steps[step] += count

    def cost(count: int) -> dict[str, float]:
        share = count / active if active else 0.0
        return {"share": round(share, 4), "us_per_request": round(share * cpu_us_per_request, 1)}

    return {
        "samples_active": active,
        "samples_idle": idle,
        "cpu_us_per_request": round(cpu_us_per_request, 1),
        "by_layer": {name: cost(n) for name, n in layers.most_common()},
        "by_step": {label: cost(steps[fn]) for fn, label in STEPS if steps[fn]},
        "top_self": {leaf: cost(n) for leaf, n in leaves.most_common(top)},
    }


def render(summary: dict[str, object]) -> str:
    lines = [
        f"profile: {summary['samples_active']} active samples; CPU per request "
        f"{summary['cpu_us_per_request']} us"
    ]
    for title, key in (("by layer (self time)", "by_layer"), ("by step (inclusive)", "by_step")):
        lines.append(f"  {title}:")
        table = summary[key]
        assert isinstance(table, dict)
        for name, value in table.items():
            lines.append(f"    {value['us_per_request']:8.1f} us  {value['share']:6.1%}  {name}")
    return "\n".join(lines)
