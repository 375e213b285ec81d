"""How the node's log lines are written: the level, and plain text or JSON lines (`[log]` in
the config, `aihub serve --log-level`), as a `logging.config.dictConfig` that the server
applies in every worker process; and the handler that writes them (`TurnStreamHandler`)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Literal

import msgspec

from federation.printable import PrintableFormatter

Level = Literal["debug", "info", "warning", "error"]
LEVELS: tuple[Level, ...] = ("debug", "info", "warning", "error")
# The plain lines' format (`log_config`).
PLAIN_FORMAT = "%(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger and message, the access log's fields
    as they are, and a traceback as one string. JSON escapes every control character, so a
    line can never be split or forged."""

    def format(self, record: logging.LogRecord) -> str:
        exception = self.formatException(record.exc_info) if record.exc_info else None
        return json_line(
            record.created,
            record.msecs,
            record.levelname,
            record.name,
            record.getMessage(),
            getattr(record, "access", None),
            exception,
        )


def json_line(
    created: float,
    msecs: float,
    level: str,
    logger: str,
    message: str,
    access: msgspec.Struct | None = None,
    exception: str | None = None,
) -> str:
    """What `JsonFormatter` makes of a record with these fields."""
    line: dict[str, Any] = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(msecs):03d}Z",
        "level": level.lower(),
        "logger": logger,
        "message": message,
    }
    if access is not None:
        line.update(msgspec.structs.asdict(access))
    if exception is not None:
        line["exception"] = exception
    return msgspec.json.encode(line).decode()


class TurnStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes the lines the event loop's thread logs during one turn
    of the loop together, at the end of that turn, in one write: under load several requests
    end in one turn, and the access log's line each was a system call of its own.

    Nothing waits longer than the current turn (no timer, no size threshold). A WARNING or
    worse, and a line from any other thread or from outside a running loop, is written at
    once, after what is held, so the order of lines is kept; `flush` and `close` (and so
    logging's own shutdown at exit) write what is held, and so does `write_held_lines` for
    a process that ends without the interpreter's exit (uvicorn's stop on a signal)."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._held: list[str] = []
        self._held_on: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held
        try:
            line = self.format(record) + self.terminator
        except Exception:  # logging's own contract: report, never raise
            self.handleError(record)
            return
        self._hold_locked(line, record.levelno)

    def hold(self, text: str, level: int) -> None:
        """A line formatted already (by the access log, node/observe/access.py, as this
        handler's formatter would have), written as `emit` writes a record's."""
        with self.lock:  # type: ignore[union-attr]
            self._hold_locked(text + self.terminator, level)

    def _hold_locked(self, line: str, level: int) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None and level < logging.WARNING:
            if self._held_on is loop:
                self._held.append(line)
                return
            if not self._held:
                self._held.append(line)
                self._held_on = loop
                loop.call_soon(self._write_held)
                return
        self._write_held_locked(line)

    def _write_held(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_held_locked()

    def _write_held_locked(self, line: str = "") -> None:
        text = "".join(self._held) + line
        self._held, self._held_on = [], None
        if text:
            try:
                self.stream.write(text)
                self.stream.flush()
            except Exception:  # a closed or broken stream must not break a request
                self.handleError(logging.makeLogRecord({"msg": text}))

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_held_locked()
        super().flush()


def write_held_lines() -> None:
    """Write what every `TurnStreamHandler` holds, now: for a process about to end without
    the interpreter's exit, whose logging shutdown would have written it (node/cli/server.py)."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):  # a PlaceHolder has none
            if isinstance(handler, TurnStreamHandler):
                handler.flush()


def log_config(level: Level = "info", json: bool = False, access: bool = True) -> dict[str, Any]:
    """The logging config of a serving node. Uvicorn's own access log stays off: ours
    (`node.observe.access`) knows the key, the model and the request id."""
    formatter: dict[str, Any] = (
        {"()": JsonFormatter} if json else {"()": PrintableFormatter, "format": PLAIN_FORMAT}
    )
    quiet = {"level": "WARNING"}
    # The access log is on when asked for and the level lets INFO through.
    access_level = "INFO" if access and level in ("debug", "info") else "WARNING"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"node": formatter},
        "handlers": {
            "stderr": {
                "()": TurnStreamHandler,
                "formatter": "node",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {
            # uvicorn's loggers write through ours (one format), not their own handlers.
            "uvicorn": {"level": level.upper(), "handlers": [], "propagate": True},
            "uvicorn.error": {"level": level.upper(), "handlers": [], "propagate": True},
            "uvicorn.access": {"level": "WARNING", "handlers": [], "propagate": False},
            "aihub.access": {"level": access_level},
            # Its jobs run every second (noticing CLI changes): only their failures are news.
            "apscheduler": quiet,
            # httpx logs every upstream request at INFO: ~200 µs each, and the usage table
            # has it all.
            "httpx": quiet,
        },
    }
