"""Reference apps that split the node's cost into layers, served exactly as `aihub serve` serves
the node (uvicorn, uvloop, httptools, no access log; or granian):

- `asgi`: a raw ASGI app answering a precomputed completion: the ASGI server's own cost;
- `asgi-forward`: a raw ASGI app forwarding the body to the mock through the node's HTTP client
  (httpx's API over aiohttp's pool): server + client;
- `litestar`: a Litestar route answering the precomputed completion: server + framework;
- `litestar-forward`: a Litestar route forwarding to the mock through the node's client:
  server + framework + client, i.e. everything the node does except its own logic;
- `litestar-aiohttp`: the same with aiohttp's client used directly, without httpx's layer.

    python -m bench.floors --app litestar-forward --port 9100 --upstream http://127.0.0.1:9000/v1
"""

# No `from __future__ import annotations`: Litestar reads the handler's annotations at run
# time, and they name classes imported inside `litestar_app`.
import argparse
from typing import Any

from bench.mock import COMPLETION, _compact

APPS = ["asgi", "asgi-forward", "litestar", "litestar-forward", "litestar-aiohttp"]
BODY = _compact(COMPLETION)


def _client() -> Any:
    """The node's client, built as node/hub.py builds it."""
    import httpx
    from httpx_aiohttp import AiohttpTransport

    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000, keepalive_expiry=30)
    timeout = httpx.Timeout(600, connect=5)
    return httpx.AsyncClient(transport=AiohttpTransport(limits=limits), timeout=timeout)


class _AiohttpClient:
    """aiohttp's own client behind the one call the apps make (`post(...).content`)."""

    def __init__(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1000, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=600),
        )

    async def post(self, url: str, content: bytes, headers: dict[str, str]) -> Any:
        async with self.session.post(url, data=content, headers=headers) as response:
            body = await response.read()

        class Answer:
            pass

        answer = Answer()
        answer.content = body  # type: ignore[attr-defined]
        return answer

    async def aclose(self) -> None:
        await self.session.close()


async def _read(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


def asgi_app(upstream: str | None) -> Any:
    state: dict[str, Any] = {}

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    if upstream:
                        state["client"] = _client()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if "client" in state:
                        await state["client"].aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = await _read(receive)
        answer = BODY
        if upstream:
            response = await state["client"].post(
                upstream + "/chat/completions",
                content=body,
                headers={"content-type": "application/json", "authorization": "Bearer x"},
            )
            answer = response.content
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(answer)).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    return app


def litestar_app(upstream: str | None, client: str = "httpx") -> Any:
    from litestar import Litestar, Request, Response, post

    state: dict[str, Any] = {}

    @post("/v1/chat/completions", status_code=200)
    async def chat(request: Request) -> Response[bytes]:
        body = await request.body()
        answer = BODY
        if upstream:
            response = await state["client"].post(
                upstream + "/chat/completions",
                content=body,
                headers={"content-type": "application/json", "authorization": "Bearer x"},
            )
            answer = response.content
        return Response(answer, media_type="application/json")

    async def startup() -> None:
        if upstream:
            state["client"] = _AiohttpClient() if client == "aiohttp" else _client()

    async def shutdown() -> None:
        if "client" in state:
            await state["client"].aclose()

    return Litestar(
        route_handlers=[chat],
        on_startup=[startup],
        on_shutdown=[shutdown],
        debug=False,
        logging_config=None,
        openapi_config=None,
    )


def create() -> Any:
    """The app named by $BENCH_FLOOR_APP (for granian's factory import)."""
    import os

    return build(os.environ["BENCH_FLOOR_APP"], os.environ.get("BENCH_FLOOR_UPSTREAM") or None)


def build(name: str, upstream: str | None) -> Any:
    forward = upstream if name.endswith(("-forward", "-aiohttp")) else None
    if name.startswith("asgi"):
        return asgi_app(forward)
    return litestar_app(forward, "aiohttp" if name.endswith("-aiohttp") else "httpx")


def main() -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", choices=APPS, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", help="the mock's base URL, e.g. http://127.0.0.1:9000/v1")
    parser.add_argument("--server", choices=["uvicorn", "granian"], default="uvicorn")
    args = parser.parse_args()
    os.environ["BENCH_FLOOR_APP"] = args.app
    os.environ["BENCH_FLOOR_UPSTREAM"] = args.upstream or ""
    if args.server == "granian":
        from granian import Granian
        from granian.constants import Interfaces

        Granian(
            "bench.floors:create",
            factory=True,
            address="127.0.0.1",
            port=args.port,
            workers=1,
            interface=Interfaces.ASGI,
        ).serve()
        return
    import uvicorn

    uvicorn.run(
        "bench.floors:create",
        factory=True,
        host="127.0.0.1",
        port=args.port,
        workers=1,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
