"""The access log: one line per HTTP request, when its answer is done (a stream's last byte
included): method, path, status, latency, key id, model and request id.

An ASGI wrapper around the app's handler (`AccessLog`) times the request and reads the
status and the `aihub-request-id` its answer carries; the endpoints that know more write it
into the request's scope (`note`): the key id once the key checked out, the model once the
request is decoded. Nothing secret is written: no header, no query string, no body, and a key
that appears in a path (`/admin/keys/{id_or_key}` takes the key itself) is cut to its public id.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import MutableMapping
from typing import Any

import msgspec
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from federation.httpsig import REQUEST_ID_HEADER
from federation.printable import printable

ACCESS_LOGGER = "aihub.access"
_KEY_ID = "aihub.key_id"
_MODEL = "aihub.model"
_REQUEST_ID = REQUEST_ID_HEADER.encode()
# A key's secret half, wherever a path holds one: `sk-hub-<id>_<secret>` -> `sk-hub-<id>_…`.
_SECRET = re.compile(r"(sk-hub-[0-9A-Za-z]*)_[A-Za-z0-9_-]+")
MAX_PATH = 256
MAX_MODEL = 128


class AccessEntry(msgspec.Struct):
    """One line of the access log (JSON lines carry these fields as they are)."""

    method: str
    path: str
    status: int  # 0: the client went away before an answer began
    latency_ms: float
    key_id: str | None
    model: str | None
    request_id: str | None


def note(
    scope: MutableMapping[str, Any], *, key_id: str | None = None, model: str | None = None
) -> None:
    """What an endpoint learnt of its request, for the access log."""
    if key_id is not None:
        scope[_KEY_ID] = key_id
    if model is not None:
        scope[_MODEL] = model


def shown_path(path: str) -> str:
    """The path as logged: no secret, no control character, bounded. Cached: a node's hot
    paths are a handful, and cleaning one is a regex and a scan of each character on every
    request; a client's endless new paths only churn the cache, whose keys are cut to
    MAX_PATH * 4 characters first (at most ~0.5 MB). A path with a key in it is not kept."""
    cut = path[: MAX_PATH * 4]
    return _clean(cut) if "sk-hub-" in cut else _shown(cut)


@functools.lru_cache(maxsize=512)
def _shown(path: str) -> str:
    return _clean(path)


def _clean(path: str) -> str:
    text = printable(_SECRET.sub(r"\1_…", path))
    return text if len(text) <= MAX_PATH else text[:MAX_PATH] + "…"


def shown_model(model: str) -> str:
    """The model as logged: no control character, at most MAX_MODEL characters. Cached as
    paths are: a node serves a handful of names, and `str.translate` of one is a walk of
    each character on every request; the key is cut first, so the cache holds at most
    512 names of MAX_MODEL characters."""
    return _shown_model(model[:MAX_MODEL])


@functools.lru_cache(maxsize=512)
def _shown_model(model: str) -> str:
    return printable(model)


def entry_line(entry: AccessEntry) -> str:
    return (
        f"{entry.method} {entry.path} {entry.status} {entry.latency_ms:.1f}ms"
        f" key={entry.key_id or '-'} model={entry.model or '-'} id={entry.request_id or '-'}"
    )


class AccessLog:
    """Wraps an ASGI app: one access-log line per HTTP request, at INFO on `aihub.access`
    (nothing is measured while that level is off)."""

    def __init__(self, app: ASGIApp, logger: logging.Logger | None = None) -> None:
        self.app = app
        self.log = logger or logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.log.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        answer: dict[str, Any] = {"status": 0, "id": None}

        async def sending(message: Message) -> None:
            await send(message)  # the app's before-send hooks stamp the request id first
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                for name, value in message.get("headers", ()):
                    if name == _REQUEST_ID:
                        answer["id"] = value.decode("latin-1")[:64]

        try:
            await self.app(scope, receive, sending)
        finally:
            self._write(scope, answer, (time.perf_counter() - started) * 1000)

    def _write(self, scope: Scope, answer: dict[str, Any], latency_ms: float) -> None:
        model = scope.get(_MODEL)  # type: ignore[call-overload]
        entry = AccessEntry(
            method=scope.get("method", "-")[:16],  # type: ignore[call-overload]
            path=shown_path(scope.get("path", "")),  # type: ignore[call-overload]
            status=answer["status"],
            latency_ms=round(latency_ms, 1),
            key_id=scope.get(_KEY_ID),  # type: ignore[call-overload]
            model=shown_model(model) if isinstance(model, str) else None,
            request_id=answer["id"],
        )
        # The record made directly: `Logger.info` would walk the stack for the caller's file
        # and line (a third of the cost of a line), which an access line does not name.
        record = self.log.makeRecord(
            self.log.name,
            logging.INFO,
            "",
            0,
            entry_line(entry),
            None,
            None,
            extra={"access": entry},
        )
        self.log.handle(record)
