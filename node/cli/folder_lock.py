"""One `aihub serve` a data folder at a time.

A start recovers what a stopped node left behind (it gives back budget reservations, replays
the journal, empties the workers' counters) and, on its way out, forgets the address it
served on. On a folder another node is serving, each of those would harm that node: its
reservations (the guard against passing a cap) released under requests in flight, its
journal written twice, its metrics emptied, its address forgotten by the invites it signs.
So `serve` holds an exclusive lock on a file in the folder for as long as it runs, taken
before anything else is touched. The kernel lets go of it when the process ends, however it
ends: a node killed with SIGKILL leaves no lock to clean up by hand.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = "serve.lock"


class FolderInUse(Exception):
    """Another process is serving the folder."""

    def __init__(self, directory: Path, pid: int | None) -> None:
        who = f" (pid {pid})" if pid else ""
        super().__init__(
            f"a node is already serving {directory}{who}: stop it first, or start this one "
            "with another --data-dir"
        )


@contextlib.contextmanager
def serving(directory: Path) -> Iterator[None]:
    """Hold the folder's lock while the block runs; FolderInUse if another process holds it.
    The file names the holder's pid, for the message (the lock itself is the flock, not the
    file, which is left in place: removing it would let two starts lock two files)."""
    descriptor = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderInUse(directory, _holder(descriptor)) from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(descriptor)


def _holder(descriptor: int) -> int | None:
    """The pid the holder wrote, if it is one (a number a human could have put there is
    only shown, never acted on)."""
    text = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() and len(text) <= 10 else None
