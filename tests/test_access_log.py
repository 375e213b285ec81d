"""The access log and the log settings, read from the stderr of a real `aihub serve`: a line
per request with method, path, status, latency, key id, model and request id; never a
secret; JSON lines when `[log] json = true`; `--log-level` honoured."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import logging.config
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from federation.printable import printable
from node.observe.logs import log_config
from node.provision import create_node
from tests.conftest import wait_ready
from tests.mocks.server import free_port

HI = [{"role": "user", "content": "hi"}]


class Served:
    def __init__(self, url: str, key: str, log: Path, process: subprocess.Popen[bytes]) -> None:
        self.url = url
        self.key = key
        self.log = log
        self.process = process

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def wait_for_line(self, found: Callable[[str], bool], seconds: float = 20) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for line in self.lines():
                if found(line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no such line in the log:\n{self.log.read_text()}")

    def sdk(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.key, max_retries=0)


@contextmanager
def served(tmp_path: Path, *flags: str, json_lines: bool = False) -> Iterator[Served]:
    folder = tmp_path / "node"
    _, key = create_node(folder, "logged")
    if json_lines:
        text = (folder / "config.toml").read_text()
        assert "json = false" in text
        (folder / "config.toml").write_text(text.replace("json = false", "json = true", 1))
    log = tmp_path / "stderr.log"
    port = free_port()
    aihub = Path(sys.executable).parent / "aihub"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [str(aihub), "serve", "--data-dir", str(folder), "--port", str(port), *flags],
            env=dict(os.environ),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, process)
            yield Served(url, key, log, process)
        finally:
            process.terminate()
            process.wait(timeout=15)


@pytest.mark.parametrize("workers", [1, 2])
def test_the_last_lines_of_a_stop_are_written(tmp_path: Path, workers: int) -> None:
    """uvicorn ends a process stopped by SIGTERM by raising the signal again once it has shut
    down, which ends it with no interpreter exit: the lines the handler held for the loop's
    last turn would go with it."""
    with served(tmp_path, "--workers", str(workers)) as node:
        node.process.terminate()
        node.process.wait(timeout=15)
        text = node.log.read_text()
    assert text.count("Application shutdown complete.") == workers, text
    assert text.count("Finished server process") == workers, text


def key_id(key: str) -> str:
    return key[len("sk-hub-") : len("sk-hub-") + 12]


def test_a_line_per_request_and_no_secret(tmp_path: Path) -> None:
    with served(tmp_path) as node:
        raw = node.sdk().chat.completions.with_raw_response.create(model="echo", messages=HI)
        request_id = raw.headers["aihub-request-id"]
        line = node.wait_for_line(lambda text: request_id in text)
        assert line.startswith("INFO aihub.access: POST /v1/chat/completions 200 ")
        assert f"key={key_id(node.key)}" in line and "model=echo" in line
        assert f"id={request_id}" in line
        latency = line.split(" 200 ")[1].split("ms")[0]
        assert float(latency) >= 0

        stream = node.sdk().chat.completions.create(model="echo", messages=HI, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        chats = lambda: [t for t in node.lines() if "POST /v1/chat/completions 200" in t]  # noqa: E731
        node.wait_for_line(lambda _: len(chats()) == 2)

        with httpx.Client(base_url=node.url) as client:
            # The admin API takes a key itself in the path: only its public id is logged.
            shown = client.get(
                f"/admin/keys/{node.key}", headers={"authorization": f"Bearer {node.key}"}
            )
            assert shown.status_code == 200
            missing = client.get("/no/such/page")
            refused = client.post(
                "/v1/chat/completions",
                json={"model": "echo", "messages": HI},
                headers={"authorization": "Bearer sk-hub-000000000000_" + "y" * 43},
            )
            forged = client.get("/health/live%0aINFO aihub.access: forged")
        secret = node.key.split("_", 1)[1]
        node.wait_for_line(lambda text: f"GET /admin/keys/sk-hub-{key_id(node.key)}_… 200" in text)
        node.wait_for_line(
            lambda text: (
                "GET /no/such/page 404" in text and missing.headers["aihub-request-id"] in text
            )
        )
        assert refused.status_code == 401
        node.wait_for_line(lambda text: "POST /v1/chat/completions 401" in text and "key=-" in text)
        assert forged.status_code == 404
        node.wait_for_line(lambda text: "/health/live\\x0aINFO aihub.access: forged 404" in text)
        log = node.log.read_text()
        assert secret not in log and "y" * 43 not in log
        assert "Bearer" not in log


def test_json_lines_when_the_config_says_so(tmp_path: Path) -> None:
    with served(tmp_path, json_lines=True) as node:
        raw = node.sdk().embeddings.with_raw_response.create(model="echo-embed", input="hi")
        request_id = raw.headers["aihub-request-id"]
        line = node.wait_for_line(lambda text: request_id in text)
        entry = json.loads(line)
        assert entry["logger"] == "aihub.access" and entry["level"] == "info"
        assert entry["method"] == "POST" and entry["path"] == "/v1/embeddings"
        assert entry["status"] == 200 and entry["latency_ms"] >= 0
        assert entry["key_id"] == key_id(node.key)
        assert entry["model"] == "echo-embed"
        assert entry["request_id"] == request_id
        assert entry["ts"].endswith("Z")
        # Every line of a node in JSON mode is JSON, the server's own included.
        for text in node.lines():
            assert isinstance(json.loads(text), dict), text


def test_log_level_from_the_command_line(tmp_path: Path) -> None:
    with served(tmp_path, "--log-level", "warning") as node:
        node.sdk().chat.completions.create(model="echo", messages=HI)
        with httpx.Client(base_url=node.url) as client:
            # A request answered after the chat: once it is, the chat's line would be there.
            assert client.get("/health/live").status_code == 200
        assert not [line for line in node.lines() if "aihub.access" in line]
        assert not [line for line in node.lines() if line.startswith("INFO")]


def test_a_bad_log_level_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "node"
    create_node(folder, "logged")
    aihub = Path(sys.executable).parent / "aihub"
    result = subprocess.run(
        [str(aihub), "serve", "--data-dir", str(folder), "--log-level", "loud"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "loud" in result.stderr


def test_a_model_is_logged_cut_and_escaped_and_cleaned_once() -> None:
    """The model as logged has no control character and at most MAX_MODEL characters, and a
    name seen before is not cleaned again (`str.translate` on every request)."""
    from node.observe import access

    access._shown_model.cache_clear()
    hostile = "gpt\x1b[2J\nINFO forged" + "x" * 500
    shown = access.shown_model(hostile)
    assert shown == printable(hostile[: access.MAX_MODEL])
    assert "\x1b" not in shown and "\n" not in shown
    assert access.shown_model(hostile) == shown
    assert access._shown_model.cache_info().hits == 1
    assert access.shown_model("echo") == "echo"


def test_access_records_are_made_from_one_template_and_are_what_logging_makes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each line's record carries what `makeRecord` would give it (its own message, time and
    fields, the formatters' every attribute), but only the first is built by
    `LogRecord.__init__`, which works out per line what never changes for these."""
    from node.observe import access

    log = logging.getLogger("aihub.test.access")
    log.propagate = False
    log.setLevel(logging.INFO)
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    log.addHandler(handler)
    built: list[str] = []
    real_init = logging.LogRecord.__init__

    def counted(self: logging.LogRecord, *args: object, **kwargs: object) -> None:
        built.append(str(args[4]))
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(logging.LogRecord, "__init__", counted)
    writer = access.AccessLog(log)
    for n in range(3):
        answer = access.Answer()
        answer.status, answer.request_id = 200 + n, f"req_{n}"
        scope = {"method": "POST", "path": f"/v1/p{n}", "aihub.key_id": "k1"}
        writer.write(scope, answer, 1.5)  # type: ignore[arg-type]
    assert len(built) == 1 and len(seen) == 3
    made = log.makeRecord(log.name, logging.INFO, "", 0, "x", None, None)
    timed = {"msg", "created", "msecs", "relativeCreated", "access"}
    for n, record in enumerate(seen):
        assert record.getMessage().startswith(f"POST /v1/p{n} {200 + n} 1.5ms key=k1")
        assert record.access.request_id == f"req_{n}"  # type: ignore[attr-defined]
        fields = {k: v for k, v in vars(record).items() if k not in timed}
        assert fields == {k: v for k, v in vars(made).items() if k not in timed}
        assert 0 <= record.msecs < 1000 and record.created <= made.created
    assert seen[0].created <= seen[1].created <= seen[2].created
    assert seen[2].relativeCreated - seen[0].relativeCreated == pytest.approx(
        (seen[2].created - seen[0].created) * 1000
    )


class _Lines(logging.Filter):
    """Counts the records that pass (a filter that drops none)."""

    def __init__(self, keep: bool = True) -> None:
        super().__init__()
        self.keep, self.seen = keep, 0

    def filter(self, record: logging.LogRecord) -> bool:
        self.seen += 1
        return self.keep


@contextmanager
def node_logging(json_lines: bool) -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger under a root set up as `log_config` sets a node up, writing to a string."""
    config = log_config("info", json=json_lines)
    config["handlers"]["stderr"]["stream"] = io.StringIO()
    config["loggers"] = {"aihub.test.direct": {"level": "INFO"}}
    root = logging.getLogger()
    kept = (root.handlers[:], root.level)
    logging.config.dictConfig(config)
    try:
        stream = root.handlers[0].stream  # type: ignore[attr-defined]
        yield logging.getLogger("aihub.test.direct"), stream
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], root.level = kept[0], kept[1]


def _write(writer: object, path: str) -> None:
    from node.observe import access

    answer = access.Answer()
    answer.status, answer.request_id = 200, "req_1"
    scope = {"method": "POST", "path": path, "aihub.key_id": "k1", "aihub.model": "m\x1b[2J"}
    writer.write(scope, answer, 2.25)  # type: ignore[attr-defined]


async def _one_turn(writer: object, path: str) -> None:
    _write(writer, path)
    await asyncio.sleep(0)  # the handler writes a turn's lines at its end


def _direct_and_recorded(json_lines: bool) -> tuple[str, str]:
    """One access line as handed to the handler formatted, and as logging writes it from
    the record (taken when a filter is on the logger, which only a record can pass)."""
    from node.observe import access

    texts = []
    for filtered in (False, True):
        with node_logging(json_lines) as (log, stream):
            counted = _Lines()
            if filtered:
                log.addFilter(counted)
            asyncio.run(_one_turn(access.AccessLog(log), "/v1/chat\ncompletions"))
            assert counted.seen == (1 if filtered else 0)
            texts.append(stream.getvalue())
    return texts[0], texts[1]


@pytest.mark.parametrize("json_lines", [False, True])
def test_an_access_line_handed_formatted_is_what_the_record_would_have_given(
    json_lines: bool,
) -> None:
    """Under the node's own logging set-up the access log hands its line to the handler
    formatted, skipping the record; the line is the one logging would have written."""
    direct, recorded = _direct_and_recorded(json_lines)
    assert direct.count("\n") == 1 and direct.endswith("\n")
    if json_lines:
        one, other = json.loads(direct), json.loads(recorded)
        assert one.pop("ts").endswith("Z") and other.pop("ts").endswith("Z")
        assert one == other and one["path"] == "/v1/chat\\x0acompletions"
    else:
        assert direct == recorded
        assert direct.startswith("INFO aihub.test.direct: POST /v1/chat\\x0acompletions 200 2.2")
        assert "\x1b" not in direct and "model=m\\x1b[2J" in direct


def test_a_renamed_level_is_named_as_logging_names_it() -> None:
    logging.addLevelName(logging.INFO, "NOTE")
    try:
        direct, recorded = _direct_and_recorded(False)
        assert direct == recorded and direct.startswith("NOTE aihub.test.direct: POST ")
        direct, recorded = _direct_and_recorded(True)
        assert json.loads(direct)["level"] == json.loads(recorded)["level"] == "note"
    finally:
        logging.addLevelName(logging.INFO, "INFO")


def test_a_filter_another_handler_or_formatter_gets_the_records_as_before() -> None:
    """Anything in the way that could drop or change a line, or look at its record, makes
    the access log go through logging as before: a filter that drops the line drops it,
    a second handler (an admin's, or pytest's caplog) gets the record, a formatter of the
    admin's formats it."""
    from node.observe import access

    with node_logging(False) as (log, stream):
        dropping = _Lines(keep=False)
        log.addFilter(dropping)
        asyncio.run(_one_turn(access.AccessLog(log), "/dropped"))
        assert dropping.seen == 1 and stream.getvalue() == ""
        log.removeFilter(dropping)

        seen: list[logging.LogRecord] = []
        other = logging.Handler()
        other.emit = seen.append  # type: ignore[method-assign]
        log.addHandler(other)  # an admin's file of access lines, say
        asyncio.run(_one_turn(access.AccessLog(log), "/both"))
        log.removeHandler(other)
        assert [r.access.path for r in seen] == ["/both"]  # type: ignore[attr-defined]
        assert "POST /both 200" in stream.getvalue()

        handler = logging.getLogger().handlers[0]
        handler.setFormatter(logging.Formatter("custom %(message)s"))
        asyncio.run(_one_turn(access.AccessLog(log), "/custom"))
        assert stream.getvalue().splitlines()[-1].startswith("custom POST /custom 200")
