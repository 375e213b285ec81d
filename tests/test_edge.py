"""The app's edge (`node/ingress/edge.py`): a POST to a hot endpoint is served without
Litestar's router, and answers exactly as it did through it: its surface's error shapes, its
request id, its access line; anything else still goes through Litestar."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest

from node.app import create_app
from node.ingress import anthropic, openai
from node.ingress.edge import Edge
from node.observe.access import ACCESS_LOGGER
from tests.conftest import NodeDir
from tests.mocks.server import serve_app

CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
MESSAGES = CHAT | {"max_tokens": 8}


class Counted:
    """Litestar's own handler (exception middleware, router, routes), counting its calls."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.paths: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.paths.append(f"{scope['method']} {scope['path']}")
        await self.inner(scope, receive, send)


def _served(node_dir: NodeDir) -> tuple[Any, Counted]:
    node_dir.add_config('[[models]]\nname = "echo"\nprovider = "echo"')
    app = create_app(node_dir.path)
    edge = app.asgi_handler
    assert isinstance(edge, Edge)
    counted = Counted(edge.inner)
    edge.inner = counted
    return app, counted


def test_hot_posts_skip_litestars_router_and_everything_else_takes_it(
    node_dir: NodeDir,
) -> None:
    app, litestar = _served(node_dir)
    auth = {"authorization": f"Bearer {node_dir.key}"}
    with serve_app(app, lifespan="on") as url, httpx.Client(base_url=url, headers=auth) as client:
        chat = client.post("/v1/chat/completions", json=CHAT)
        messages = client.post("/v1/messages", json=MESSAGES)
        with client.stream("POST", "/v1/chat/completions", json=CHAT | {"stream": True}) as s:
            stream_status, streamed = s.status_code, s.read()
        assert litestar.paths == []
        assert chat.status_code == messages.status_code == stream_status == 200
        assert chat.json()["choices"][0]["message"]["content"]
        assert messages.json()["type"] == "message"
        assert streamed.rstrip().endswith(b"data: [DONE]")

        # Not plainly a hot POST: Litestar routes it, and answers as it always did.
        models = client.get("/v1/models")
        wrong_method = client.get("/v1/chat/completions")
        slash = client.post("/v1/chat/completions/", json=CHAT)
        bad_host = client.post("/v1/chat/completions", json=CHAT, headers={"host": "a\\b"})
    assert litestar.paths == [
        "GET /v1/models",
        "GET /v1/chat/completions",
        "POST /v1/chat/completions/",
        "POST /v1/chat/completions",
    ]
    assert models.status_code == 200 and slash.status_code == 200
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert wrong_method.json()["error"]["type"] == "invalid_request_error"
    assert bad_host.status_code == 400
    answers = (chat, messages, models, wrong_method, slash, bad_host)
    assert all(a.headers["aihub-request-id"].startswith("req_") for a in answers)
    # A handler's own id is kept, not stamped over: the usage row and receipt name it.
    assert chat.json()["id"].endswith(chat.headers["aihub-request-id"].removeprefix("req_"))


def _boom(*_: object, **__: object) -> None:
    raise RuntimeError("a bug of ours")


def test_a_hot_endpoint_that_raises_answers_in_its_surfaces_shape_and_is_logged(
    node_dir: NodeDir, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """What Litestar's exception middleware did for these routes, the edge does: the route's
    own handlers (Anthropic's shape for Messages, OpenAI's elsewhere), before the answer began."""
    app, litestar = _served(node_dir)
    monkeypatch.setattr(openai, "decode_body", _boom)
    monkeypatch.setattr(anthropic, "_messages_decoder", type("D", (), {"decode": _boom})())
    auth = {"authorization": f"Bearer {node_dir.key}"}
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    with serve_app(app, lifespan="on") as url, httpx.Client(base_url=url, headers=auth) as client:
        chat = client.post("/v1/chat/completions", json=CHAT)
        messages = client.post("/v1/messages", json=MESSAGES)
        unauthenticated = client.post("/v1/messages", json=MESSAGES, headers={"authorization": ""})
    assert litestar.paths == []
    assert chat.status_code == messages.status_code == 500
    assert chat.json()["error"] == {
        "message": "Internal error",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    assert messages.json()["type"] == "error"
    assert messages.json()["error"]["type"] == "api_error"
    assert unauthenticated.status_code == 401
    assert unauthenticated.json()["error"]["type"] == "authentication_error"
    for answer in (chat, messages, unauthenticated):
        request_id = answer.headers["aihub-request-id"]
        assert any(
            f" {answer.status_code} " in r.getMessage() and f"id={request_id}" in r.getMessage()
            for r in caplog.records
            if r.name == ACCESS_LOGGER
        ), request_id
    assert any(
        "unhandled error on POST /v1/chat/completions" in r.getMessage() for r in caplog.records
    )


def test_a_hot_post_builds_no_litestar_headers_and_reads_them_as_litestar_did(
    node_dir: NodeDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hot endpoints read a plain dict of the headers, made once (`headers_of`): Litestar's
    multidict is never built for them. The first of a repeated header wins, as it did."""
    from litestar.datastructures import Headers

    from node.ingress.headers import headers_of

    app, _ = _served(node_dir)
    built: list[object] = []
    real = Headers.from_scope.__func__  # type: ignore[attr-defined]

    def counted(cls: type[Headers], scope: Any) -> Headers:
        built.append(scope["path"])
        return real(cls, scope)

    monkeypatch.setattr(Headers, "from_scope", classmethod(counted))
    auth = {"authorization": f"Bearer {node_dir.key}"}
    with serve_app(app, lifespan="on") as url, httpx.Client(base_url=url, headers=auth) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert client.post("/v1/messages", json=MESSAGES).status_code == 200
    assert built == []

    raw = [(b"x-twice", b"first"), (b"Authorization", b"Bearer k"), (b"x-twice", b"second")]
    request: Any = type("R", (), {"scope": {"headers": raw}})()
    assert headers_of(request) == {"x-twice": "first", "authorization": "Bearer k"}
    assert headers_of(request) is headers_of(request)  # made once a request
