"""What the node's upstream client costs per request, by way of calling it: CPU time (this
process's, `time.process_time`) per chat completion against the raw mock (bench/mock.py, in its
own process), `--connections` requests in flight, the ways interleaved in rounds. How a client
for adapters/http.py is chosen (bench/README.md, "Unpinned results", has the numbers and why
pyreqwest, the cheapest, is not used yet).

    taskset -c 0 .venv/bin/python -m bench.client_cost [--requests 4000] [--rounds 5]

The mock is pinned to the other core when there is one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator

import aiohttp
import httpx
import msgspec
import yarl

from adapters import aiohttp_post
from adapters.http import ATTEMPT_DEADLINE, UpstreamClient, build_request, send
from adapters.openai import OpenAIAdapter
from adapters.types import ChatCall, ChatRequest, Upstream
from bench import procs
from bench.run import free_port
from bench.surfaces import body

HEADERS = {"content-type": "application/json", "authorization": "Bearer sk-bench-upstream"}
Call = Callable[[], Awaitable[int]]


def _upstream(url: str) -> Upstream:
    return Upstream(
        provider="openai",
        model="mock-model",
        base_url=url.removesuffix("/chat/completions"),
        api_key=HEADERS["authorization"].removeprefix("Bearer "),
    )


def _chat_call(data: bytes) -> ChatCall:
    return ChatCall(
        msgspec.json.decode(data, type=ChatRequest),
        msgspec.json.decode(data, type=dict[str, msgspec.Raw]),
        "req-bench",
    )


@contextlib.contextmanager
def _attempt() -> Iterator[None]:
    """The attempt's deadline, as the router sets it around every adapter call."""
    token = ATTEMPT_DEADLINE.set(asyncio.get_running_loop().time() + 600)
    try:
        yield
    finally:
        ATTEMPT_DEADLINE.reset(token)


def ways(url: str, data: bytes) -> dict[str, Callable[[], Awaitable[tuple[Call, Callable]]]]:
    """Each way to send one request, as (made once: the call, its close)."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=600)

    async def session() -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=100, keepalive_timeout=30)
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    async def aiohttp_str() -> tuple[Call, Callable]:
        s = await session()

        async def call() -> int:
            async with s.post(url, data=data, headers=HEADERS, timeout=timeout) as r:
                await r.read()
                return r.status

        return call, s.close

    async def aiohttp_url() -> tuple[Call, Callable]:
        s = await session()
        built = yarl.URL(url)

        async def call() -> int:
            async with s.post(built, data=data, headers=HEADERS, timeout=timeout) as r:
                await r.read()
                return r.status

        return call, s.close

    async def aiohttp_below() -> tuple[Call, Callable]:
        # The same call on the same session below ClientSession.request (since 2026-12-02)
        # and below ClientRequest.send (since 2026-12-03), as the node makes it
        # (adapters/aiohttp_post.py).
        s = await session()
        pool = aiohttp_post.Pool(s)
        built = yarl.URL(url)

        async def call() -> int:
            r = await aiohttp_post.post(pool, built, data, HEADERS, timeout)
            await r.content.read()
            r.release()
            return r.status

        return call, s.close

    async def aiohttp_lean() -> tuple[Call, Callable]:
        # A prebuilt URL, the session's default headers and timeout, no per-call options.
        connector = aiohttp.TCPConnector(limit=100, keepalive_timeout=30)
        s = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            headers=HEADERS,
            timeout=timeout,
            auto_decompress=False,
        )
        built = yarl.URL(url)

        async def call() -> int:
            async with s.post(built, data=data) as r:
                await r.read()
                return r.status

        return call, s.close

    async def httpx_h11() -> tuple[Call, Callable]:
        client = httpx.AsyncClient(limits=httpx.Limits(max_connections=100))

        async def call() -> int:
            r = await client.post(url, content=data, headers=HEADERS)
            return r.status_code

        return call, client.aclose

    async def pyreqwest_client() -> tuple[Call, Callable]:
        # Measured only (not a dependency): pip install pyreqwest. Its tokio threads' CPU is
        # this process's too, so it is counted.
        from pyreqwest.client import ClientBuilder

        client = ClientBuilder().max_connections(100).build()

        async def call() -> int:
            request = client.post(url).headers(HEADERS).body_bytes(data).build()
            response = await request.send()
            await response.bytes()
            return response.status

        return call, client.close

    async def node_send() -> tuple[Call, Callable]:
        # adapters/http.py's send() as the OpenAI adapter calls it, within an attempt's
        # deadline as the router sets it: the node's own code around aiohttp included.
        client = UpstreamClient()
        upstream = _upstream(url)

        async def call() -> int:
            request = build_request(
                upstream, url, data, {"authorization": HEADERS["authorization"]}
            )
            with _attempt():
                response = await send(client, upstream, request)
            return response.status_code

        return call, client.aclose

    async def node_chat() -> tuple[Call, Callable]:
        # The OpenAI adapter's chat(): the body encoded, sent, the answer peeked at for usage.
        client = UpstreamClient()
        adapter = OpenAIAdapter(_upstream(url), client)
        call_ = _chat_call(data)

        async def call() -> int:
            with _attempt():
                result = await adapter.chat(call_)
            return 200 if result.wire else 500

        return call, client.aclose

    async def node_stream() -> tuple[Call, Callable]:
        # The OpenAI adapter's stream, read to its end and closed as the pipeline does (the
        # body's end drained, the connection kept).
        client = UpstreamClient()
        adapter = OpenAIAdapter(_upstream(url), client)
        call_ = _chat_call(body("chat", "mock-model", stream=True))

        async def call() -> int:
            with _attempt():
                stream = await adapter.open_stream(call_)
                try:
                    events = [event async for event in stream]
                finally:
                    await stream.aclose()
            return 200 if events else 500

        return call, client.aclose

    found = {
        "aiohttp, str URL (the node's before 2026-12-02)": aiohttp_str,
        "aiohttp, prebuilt yarl.URL": aiohttp_url,
        "aiohttp below ClientRequest.send (adapters/aiohttp_post.py)": aiohttp_below,
        "aiohttp, prebuilt URL, session defaults": aiohttp_lean,
        "httpx (h11)": httpx_h11,
        "the node's send() (adapters/http.py)": node_send,
        "the OpenAI adapter's chat()": node_chat,
        "the OpenAI adapter's stream, read and closed": node_stream,
    }
    if importlib.util.find_spec("pyreqwest") is not None:
        found["pyreqwest"] = pyreqwest_client
    return found


async def measure(make: Callable, requests: int, connections: int) -> float:
    call, close = await make()
    for _ in range(50):
        await call()  # connect and warm
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            if await call() != 200:
                raise RuntimeError("the mock answered an error")

    started = time.process_time()
    await asyncio.gather(*(worker() for _ in range(connections)))
    used = time.process_time() - started
    await close()
    return used / requests * 1e6


async def compare(args: argparse.Namespace, port: int) -> None:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    for _ in range(100):
        try:
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/"):
                break
        except aiohttp.ClientError:
            await asyncio.sleep(0.05)
    data = body("chat", "mock-model")
    chosen = [name for name in ways(url, data) if args.only in name]
    found: dict[str, list[float]] = {name: [] for name in chosen}
    for _ in range(args.rounds):
        for name, make in ways(url, data).items():
            if name not in found:
                continue
            found[name].append(await measure(make, args.requests, args.connections))
    print(
        f"CPU per request, {args.requests} requests x {args.rounds} rounds, "
        f"{args.connections} in flight; load {os.getloadavg()[0]:.1f}"
    )
    for name, values in found.items():
        spread = f"({min(values):.1f}..{max(values):.1f})"
        print(f"{statistics.median(values):8.1f} us  {spread}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument(
        "--only", default="", help="the ways whose name holds this text (e.g. node, aiohttp)"
    )
    args = parser.parse_args()
    port = free_port()
    _, others = procs.split_cores()
    mock = subprocess.Popen(
        [sys.executable, "-m", "bench.mock", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        preexec_fn=(lambda: os.sched_setaffinity(0, others) if others else None),
    )
    try:
        import uvloop

        uvloop.run(compare(args, port))
    finally:
        procs.stop(mock)


if __name__ == "__main__":
    main()
