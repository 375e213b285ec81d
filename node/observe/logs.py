"""How the node's log lines are written: the level, and plain text or JSON lines (`[log]` in
the config, `aihub serve --log-level`), as a `logging.config.dictConfig` that the server
applies in every worker process."""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import msgspec

from federation.printable import PrintableFormatter

Level = Literal["debug", "info", "warning", "error"]
LEVELS: tuple[Level, ...] = ("debug", "info", "warning", "error")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger and message, the access log's fields
    as they are, and a traceback as one string. JSON escapes every control character, so a
    line can never be split or forged."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if access is not None:
            line.update(msgspec.structs.asdict(access))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return msgspec.json.encode(line).decode()


def log_config(level: Level = "info", json: bool = False, access: bool = True) -> dict[str, Any]:
    """The logging config of a serving node. Uvicorn's own access log stays off: ours
    (`node.observe.access`) knows the key, the model and the request id."""
    formatter: dict[str, Any] = (
        {"()": JsonFormatter}
        if json
        else {"()": PrintableFormatter, "format": "%(levelname)s %(name)s: %(message)s"}
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
                "class": "logging.StreamHandler",
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
