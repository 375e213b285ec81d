"""Hearing that another process changed keys, tenants or peers: the database notifies each
commit that changes them (migration 11), and every process of the node listens on a connection
of its own, so that a key revoked on one host is refused on every other one as soon as the
notification lands (it is sent at commit; on a LAN it arrives well before any request sent
after the change returned). Nothing is read on the request path for it.

If the listening connection is lost, whatever changed meanwhile cannot be heard: each aggregate
is taken as changed when it is lost and again once it is back, and it is reconnected every
second until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg

CHANNEL = "aihub_changes"
AGGREGATES = ("keys", "peers")
RECONNECT_SECONDS = 1.0

log = logging.getLogger(__name__)


class ChangeWatch:
    """One listening connection, kept open by a task of its own until `stop`."""

    def __init__(self, url: str, password: str | None, changed: Callable[[str], None]) -> None:
        self._url = url
        self._password = password
        self._changed = changed
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._stopping = False

    async def start(self) -> None:
        """Listen; return once the first connection listens (or has failed once)."""
        self._task = asyncio.create_task(self._run(), name="storage.changes")
        await self._ready.wait()

    async def stop(self) -> None:
        self._stopping = True  # the connection closed now is no change missed
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _heard(self, _connection: object, _pid: int, _channel: str, payload: str) -> None:
        if payload in AGGREGATES:
            self._changed(payload)

    def _all_changed(self) -> None:
        for aggregate in AGGREGATES:
            self._changed(aggregate)

    async def _run(self) -> None:
        heard_before = False
        while True:
            try:
                connection = await asyncpg.connect(self._url, password=self._password)
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                log.warning("not listening for changes by other processes: %s", exc)
                self._ready.set()
            else:
                await self._listen(connection, heard_before)
                heard_before = True
            await asyncio.sleep(RECONNECT_SECONDS)

    async def _listen(self, connection: asyncpg.Connection, heard_before: bool) -> None:
        """Listen on `connection` until it is lost."""
        lost = asyncio.Event()
        try:
            connection.add_termination_listener(lambda _: lost.set())
            await connection.add_listener(CHANNEL, self._heard)
            if heard_before:
                self._all_changed()  # what changed while we could not hear it
            self._ready.set()
            await lost.wait()
            log.warning("lost the connection that hears other processes' changes")
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("listening for changes failed: %s", exc)
        finally:
            if not self._stopping:
                self._all_changed()
            with contextlib.suppress(Exception):
                await connection.close(timeout=1)
