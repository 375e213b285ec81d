"""A change of keys is honoured by every process of the node once its command returns.

The database counts every change of keys and tenants, whoever makes it (a trigger bumps the
`changes` counter: `ProcessStore.epoch`). Each serving process writes a heartbeat each second
(`Heartbeat.beat`) that says which epoch its key cache holds, and reloads the cache when the
database's epoch is another; it also reloads, and says so at once, as soon as it hears of a
change (PostgreSQL's notification). Whoever changed a key then waits (`confirm`), at most
`CONFIRM_SECONDS`, until every live process (a heartbeat younger than `PROCESS_FRESH_MS`)
has applied the change's epoch, and names those that did not: what they do is then bounded
by the trust rule below.

Processes that share the changer's data folder are not waited for: they read its
`keys.epoch` file on every request (`node/gateway/auth.py`), which the change touched before
the command returned.

The trust rule: a process checks requests against its cache only while its last heartbeat
that found the cache current began less than `TRUST_SECONDS` ago (`KeyCache.trust_until`),
well below `PROCESS_FRESH_MS`. A process whose heartbeats fail (the database away, or the
process cut off from it) has stopped trusting its cache before anyone stops waiting for it:
from then on it checks each request against the store.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import msgspec

from node.gateway.auth import KeyCache
from node.storage.base import Store
from node.storage.records import PROCESS_FRESH_MS, ProcessBeat, ProcessRecord, StoreUnavailable

log = logging.getLogger(__name__)

# Each process says it is alive (and which keys it holds) this often.
HEARTBEAT_SECONDS = 1.0
# A process uses its key cache without asking the store for this long after the start of a
# heartbeat that found it current: below PROCESS_FRESH_MS by a margin for a heartbeat's own
# round trip and for a busy event loop.
TRUST_SECONDS = 10.0
assert TRUST_SECONDS * 1000 < PROCESS_FRESH_MS
# Whoever changed a key waits this long, at most, for every live process to apply it.
CONFIRM_SECONDS = 2.0
# How often the waiting side looks again: from a few milliseconds (the change is usually
# applied by the time of the first look or the second) up to this.
_POLL_MAX_SECONDS = 0.1


def folder_id(directory: Path) -> str:
    """Which data folder this is, the same for every process that serves from it and for the
    commands run on it: the host, and the folder's device and inode."""
    info = os.stat(directory)
    return f"{socket.gethostname()}:{info.st_dev}:{info.st_ino}"


class Heartbeat:
    """This process's side: its heartbeat, and its answer to a change heard of."""

    def __init__(self, store: Store, keys: KeyCache, holder: str, directory: Path) -> None:
        self._store = store
        self._keys = keys
        self._me = ProcessBeat(
            holder=holder,
            host=socket.gethostname(),
            pid=os.getpid(),
            folder=folder_id(directory),
            path=str(directory.resolve()),
            applied=0,
        )
        self._acked = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._left = False
        keys.listeners.append(self._loaded)

    async def beat(self) -> None:
        """Say this process is alive and which keys it holds; reload them if the database's
        epoch is another; then trust the cache for TRUST_SECONDS from this beat's start."""
        started = time.monotonic()
        self._keys.recheck_epoch_file()  # a `keys.epoch` replaced is heard of from now on
        applied = self._keys.applied
        epoch = await self._store.processes.beat(msgspec.structs.replace(self._me, applied=applied))
        if epoch != self._keys.applied:
            await self._keys.load()  # `_loaded` says which epoch it holds now
        self._keys.trust_until(started + TRUST_SECONDS)

    def heard(self) -> None:
        """Another process changed keys or tenants (PostgreSQL's notification): reload now,
        not at the next request, so that whoever changed them stops waiting at once."""
        self._keys.mark_stale()
        self._spawn(self._keys.load())

    async def leave(self) -> None:
        """This process stops: nobody is to wait for it."""
        self._left = True
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._store.processes.leave(self._me.holder)

    def _loaded(self) -> None:
        if self._keys.applied != self._acked:
            self._spawn(self._ack())

    async def _ack(self) -> None:
        epoch = self._keys.applied
        if epoch == self._acked:
            return
        await self._store.processes.applied(self._me.holder, epoch)
        self._acked = max(self._acked, epoch)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        if self._left:
            work.close()
            return
        task = asyncio.get_running_loop().create_task(_logged(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _logged(work: Coroutine[Any, Any, None]) -> None:
    """Background work that must not die with a traceback: the store away is said, and the
    next heartbeat tries again."""
    try:
        await work
    except StoreUnavailable as exc:
        log.warning("applying a change of keys waits for the store: %s", exc)


def describe(process: ProcessRecord) -> str:
    """A process that has not applied a change, as a person can find it."""
    return (
        f"process {process.pid} on {process.host} ({process.path}), last heard from"
        f" {process.age_ms / 1000:.1f} s ago, has not confirmed the change yet: it checks"
        " each request against the database once it has not heard from it for"
        f" {TRUST_SECONDS:.0f} s"
    )


async def confirm(store: Store, directory: Path, seconds: float = CONFIRM_SECONDS) -> list[str]:
    """Wait until every live process of the node outside `directory` holds the keys as they
    are now (a change just committed); what is said of those that did not within `seconds`
    (nothing: all did)."""
    try:
        return await _confirm(store, folder_id(directory), seconds)
    except StoreUnavailable as exc:
        return [f"could not check that the node's other processes applied the change: {exc}"]


async def _confirm(store: Store, folder: str, seconds: float) -> list[str]:
    epoch = await store.processes.epoch()
    deadline = time.monotonic() + seconds
    pause = 0.005
    while True:
        waiting = [
            process
            for process in await store.processes.live()
            if process.folder != folder and process.applied < epoch
        ]
        left = deadline - time.monotonic()
        if not waiting:
            return []
        if left <= 0:
            return [describe(process) for process in waiting]
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 2, _POLL_MAX_SECONDS)
