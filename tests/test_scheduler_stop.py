"""A node's periodic work stops quietly (node/hub.py `stop_scheduler`): a job the scheduler
has just handed to the event loop, cancelled by the shutdown before its first step, was logged
as the job's failure with a traceback on a clean stop (a test of two serving processes saw it
in a log)."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import pytest
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from node.hub import _while_store_answers, stop_scheduler


async def _due_as_the_node_stops(stop: bool) -> list[str]:
    """A wrapped job whose time comes while the node stops: its timer fires (the scheduler's
    `_process_jobs`) after the stop began and before the shutdown it queued has run, as on
    uvloop, which runs due timers before what `call_soon` queued; stopped by
    `stop_scheduler`, or by a bare shutdown as the node did before."""
    ran: list[str] = []

    async def job() -> None:
        ran.append("began")
        await asyncio.Event().wait()  # still running when the node stops

    scheduler = AsyncIOScheduler()
    scheduler.start()
    await asyncio.sleep(0)  # started: its first wake-up has run

    def fire() -> None:
        """The job falls due, and its timer fires."""
        scheduler.add_job(_while_store_answers(job), "interval", seconds=3600, next_run_time=now)
        scheduler._process_jobs()

    now = datetime.now(UTC)
    if stop:
        stopping = asyncio.create_task(stop_scheduler(scheduler))
        await asyncio.sleep(0)  # the stop has begun and waits its turn
        fire()
        await stopping
    else:
        scheduler.shutdown(wait=False)  # queued on the loop (AsyncIOScheduler's way)
        fire()  # the job handed over as a task, its first step queued after the shutdown
    for _ in range(3):
        await asyncio.sleep(0)  # the shutdown, the cancelled task's end and its callback
    return ran


@pytest.mark.parametrize("stop", [True, False])
def test_a_job_handed_over_as_the_node_stops_ends_quietly(
    stop: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="apscheduler"):
        ran = asyncio.run(_due_as_the_node_stops(stop))
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert ran == []
    if stop:
        assert failures == []
    else:  # the bare shutdown cancelled it before it began: what `stop_scheduler` is for
        assert ran == [] and len(failures) == 1, failures
        assert failures[0].getMessage().startswith("Error running job")
