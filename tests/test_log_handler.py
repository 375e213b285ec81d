"""The node's log handler (node/observe/logs.py `TurnStreamHandler`): what the event loop's
thread logs in one turn of the loop is written at the end of that turn in one write, in
order; a warning, a line from another thread or from outside a loop, `flush` and `close`
write at once, after what is held. (Lines of a real `aihub serve`: tests/test_access_log.py.)"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from collections.abc import Iterator

import pytest

from node.observe.logs import TurnStreamHandler


class Writes(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, Writes, TurnStreamHandler]]:
    stream = Writes()
    handler = TurnStreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("tests.turn_handler")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield logger, stream, handler
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_one_turns_lines_are_one_write_in_order(logged) -> None:
    logger, stream, _ = logged

    async def scenario() -> None:
        for n in range(3):
            logger.info("request %d", n)
        assert stream.calls == []  # held until the turn ends
        await asyncio.sleep(0)
        logger.info("next turn")
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert stream.calls == ["INFO request 0\nINFO request 1\nINFO request 2\n", "INFO next turn\n"]


def test_a_warning_is_written_at_once_after_what_is_held(logged) -> None:
    logger, stream, _ = logged

    async def scenario() -> None:
        logger.info("before")
        logger.warning("trouble")
        assert stream.calls == ["INFO before\nWARNING trouble\n"]
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert stream.getvalue() == "INFO before\nWARNING trouble\n"


def test_other_threads_and_no_loop_write_at_once_in_order(logged) -> None:
    logger, stream, _ = logged
    logger.info("no loop")
    assert stream.calls == ["INFO no loop\n"]

    async def scenario() -> None:
        logger.info("held")
        thread = threading.Thread(target=logger.info, args=("from a thread",))
        thread.start()
        thread.join()
        logger.info("after the thread")
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert stream.getvalue() == (
        "INFO no loop\nINFO held\nINFO from a thread\nINFO after the thread\n"
    )


def test_flush_and_close_write_what_is_held(logged) -> None:
    logger, stream, handler = logged

    async def scenario() -> None:
        logger.info("one")
        handler.flush()
        assert stream.getvalue() == "INFO one\n"
        logger.info("two")

    loop = asyncio.new_event_loop()
    try:
        # The turn that would have written "two" never runs: the loop stops first.
        loop.run_until_complete(scenario())
    finally:
        loop.close()
    handler.close()
    assert stream.getvalue() == "INFO one\nINFO two\n"
