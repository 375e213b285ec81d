"""The access log: one line per HTTP request, when its answer is done (a stream's last byte
included): method, path, status, latency, key id, model and request id.

The app's edge (`node/ingress/edge.py`) times the request and reads the status and the
`aihub-request-id` its answer carries; the endpoints that know more write it into the
request's scope (`note`): the key id once the key checked out, the model once the
request is decoded. Nothing secret is written: no header, no query string, no body, and a key
that appears in a path (`/admin/keys/{id_or_key}` takes the key itself) is cut to its public id.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
import time
from collections.abc import MutableMapping
from typing import Any

import msgspec
from litestar.types import Scope

from federation.printable import PrintableFormatter, printable
from node.observe.logs import PLAIN_FORMAT, JsonFormatter, TurnStreamHandler, json_line

ACCESS_LOGGER = "aihub.access"
_KEY_ID = "aihub.key_id"
_MODEL = "aihub.model"
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


def _now() -> tuple[float, float]:
    """A line's time and its milliseconds, as `LogRecord` has them."""
    created = time.time()
    return created, int((created - int(created)) * 1000) + 0.0


def _formatted(handler: logging.Handler, name: str, line: str, entry: AccessEntry) -> str | None:
    """What `handler`'s formatter makes of an access record of `line`, when it is one of
    `log_config`'s as that sets it up; None for any other."""
    formatter = handler.formatter
    kind = type(formatter)
    level = logging.getLevelName(logging.INFO)  # as a record's `levelname` (addLevelName)
    if kind is JsonFormatter:
        return json_line(*_now(), level, name, line, entry)
    if (
        kind is PrintableFormatter
        and formatter._fmt == PLAIN_FORMAT  # type: ignore[union-attr]
        and type(formatter._style) is logging.PercentStyle  # type: ignore[union-attr]
    ):
        return printable(f"{level} {name}: {line}")
    return None


def entry_line(entry: AccessEntry) -> str:
    return (
        f"{entry.method} {entry.path} {entry.status} {entry.latency_ms:.1f}ms"
        f" key={entry.key_id or '-'} model={entry.model or '-'} id={entry.request_id or '-'}"
    )


class Answer:
    """What the edge saw of a request's answer: its status (0 until its head is sent: the
    client went away first) and its request id."""

    __slots__ = ("request_id", "status")

    def __init__(self) -> None:
        self.status = 0
        self.request_id: str | None = None


class AccessLog:
    """Writes the access lines, at INFO on its logger, each as a log record made from one
    template: `LogRecord.__init__` works out again for every line what never changes for these
    (the file and module of an empty path, the level's name, the process and its name), ~15 µs
    a line at 1,000 requests a second (py-spy, pinned), the largest single leaf of a request.
    A record factory of someone else's (`logging.setLogRecordFactory`) gets its own records."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self._template: dict[str, Any] | None = None

    def enabled(self) -> bool:
        return self.log.isEnabledFor(logging.INFO)

    def write(self, scope: Scope, answer: Answer, latency_ms: float) -> None:
        """The request's line (the edge writes one per HTTP request, when its answer is done,
        while INFO is on)."""
        model = scope.get(_MODEL)  # type: ignore[call-overload]
        entry = AccessEntry(
            method=scope.get("method", "-")[:16],  # type: ignore[call-overload]
            path=shown_path(scope.get("path", "")),  # type: ignore[call-overload]
            status=answer.status,
            latency_ms=round(latency_ms, 1),
            key_id=scope.get(_KEY_ID),  # type: ignore[call-overload]
            model=shown_model(model) if isinstance(model, str) else None,
            request_id=answer.request_id,
        )
        line = entry_line(entry)
        handler = self._direct()
        text = _formatted(handler, self.log.name, line, entry) if handler is not None else None
        if handler is None or text is None:
            self.log.handle(self._record(line, entry))
        else:
            handler.hold(text, logging.INFO)

    def _direct(self) -> TurnStreamHandler | None:
        """The handler a line reaches when it is the only one and the node's own, and nothing
        on the way can drop or change the line (no filter; logging's own record factory):
        as `log_config` sets the node up. The line is then handed to it formatted, without a
        record, `Logger.handle` or the formatter's generic path, which cost more than the
        rest of the line (bench/README.md). Anything else, an admin's logging config or
        pytest's caplog, gets its records as before."""
        log = self.log
        if log.filters or log.disabled or logging.getLogRecordFactory() is not logging.LogRecord:
            return None
        found: logging.Handler | None = None
        logger: logging.Logger | None = log
        while logger is not None:  # the handlers `Logger.callHandlers` would call
            for handler in logger.handlers:
                if found is not None:
                    return None
                found = handler
            logger = logger.parent if logger.propagate else None
        if type(found) is not TurnStreamHandler or found.filters or found.level > logging.INFO:
            return None
        return found

    def _record(self, line: str, entry: AccessEntry) -> logging.LogRecord:
        log = self.log
        if logging.getLogRecordFactory() is not logging.LogRecord:
            # Made directly: `Logger.info` would walk the stack for the caller's file and line.
            extra = {"access": entry}
            return log.makeRecord(log.name, logging.INFO, "", 0, line, None, None, extra=extra)
        template = self._template
        thread = threading.get_ident()
        if template is None or template["thread"] != thread or template["process"] != os.getpid():
            # The first line, or one from another thread or process than the last: a record
            # made the usual way is the template (its thread and process are this line's).
            record = log.makeRecord(log.name, logging.INFO, "", 0, line, None, None)
            self._template = dict(record.__dict__)
            record.access = entry
            return record
        record = logging.LogRecord.__new__(logging.LogRecord)
        fields = record.__dict__
        fields.update(template)
        created, msecs = _now()
        fields["msg"] = line
        fields["created"] = created
        fields["msecs"] = msecs
        fields["relativeCreated"] = (
            template["relativeCreated"] + (created - template["created"]) * 1000
        )
        fields["access"] = entry
        return record
