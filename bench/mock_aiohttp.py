"""The unpinned mode's mock OpenAI upstream, written with aiohttp's web server as a small real
upstream would be (bench/mock.py is the raw-uvloop one that the pinned mode uses so that it is
never the bottleneck). Same answers as bench/mock.py: a chat completion, or with
`"stream":true` an SSE stream of `--chunks` deltas `--chunk-gap-ms` apart.

    python -m bench.mock_aiohttp --port 9000 [--chunks 8] [--chunk-gap-ms 2]
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

from bench.mock import COMPLETION, _compact, sse_data


class Answers:
    def __init__(self, chunks: int, gap_ms: float) -> None:
        self.completion = _compact(COMPLETION)
        self.gap = gap_ms / 1000
        self.events = {
            usage: [b"data: " + data + b"\n\n" for data in sse_data(chunks, usage)]
            for usage in (False, True)
        }


def app(answers: Answers) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if b'"stream":true' not in body:
            return web.Response(body=answers.completion, content_type="application/json")
        response = web.StreamResponse(
            headers={"content-type": "text/event-stream", "cache-control": "no-cache"}
        )
        await response.prepare(request)
        for index, event in enumerate(answers.events[b'"include_usage":true' in body]):
            if index and answers.gap > 0:
                await asyncio.sleep(answers.gap)
            await response.write(event)
        await response.write_eof()
        return response

    async def other(_request: web.Request) -> web.Response:
        return web.Response(body=b"{}", content_type="application/json")

    application = web.Application()
    application.router.add_post("/v1/chat/completions", chat)
    application.router.add_route("*", "/{tail:.*}", other)
    return application


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--chunk-gap-ms", type=float, default=2.0)
    args = parser.parse_args()
    # aiohttp's own default loop (asyncio's), no access log: a plain aiohttp service.
    web.run_app(
        app(Answers(args.chunks, args.chunk_gap_ms)),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=lambda text: print(text, flush=True),
    )


if __name__ == "__main__":
    main()
