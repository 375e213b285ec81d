"""Cooldowns the workers of one data folder share.

A deployment that keeps failing rests (`Router._failed`); each worker learnt that on its own,
so a failing upstream took every worker's own failed attempts (and their retry delays) before
all of them let it rest, and a Retry-After one worker was told was honoured by that worker
alone. With several workers, `aihub serve` makes a file of one 8-byte slot per local
deployment (its place in the config): when it rests and until when, in the clock's seconds.
Every worker maps it into memory, so that reading a slot on the request path is a memory
read, no system call; a worker that puts a deployment to rest writes its slot, one that is
answered by it clears it. Peers' routes are not here: their backoff is each worker's own.

The file holds nothing that must survive: `serve` makes it anew at each start (the config,
and so the slots, may have changed) and none is made for a single process. A value that
makes no sense (the file edited, a write torn) is bounded by `MAX_REST`: at worst, a
deployment is tried after the others for that long.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

COOLDOWNS_FILE = "cooldowns"
_SLOT = struct.Struct("<d")
# The longest rest a slot can impose, whatever it holds: the longest a Retry-After is taken
# for (adapters/types.py MAX_RETRY_AFTER).
MAX_REST = 3600.0


def make_board(directory: Path, deployments: int) -> None:
    """The board's file for a start with several workers, every slot clear."""
    path = directory / COOLDOWNS_FILE
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, max(deployments, 1) * _SLOT.size)
    finally:
        os.close(fd)


def drop_board(directory: Path) -> None:
    """No board for a single process (a file left by an earlier start is not used)."""
    (directory / COOLDOWNS_FILE).unlink(missing_ok=True)


class CooldownBoard:
    """The shared slots, mapped; None from `open` when the node runs one process."""

    def __init__(self, view: mmap.mmap, slots: int) -> None:
        self._view = view
        self.slots = slots

    @classmethod
    def open(cls, directory: Path) -> CooldownBoard | None:
        try:
            fd = os.open(directory / COOLDOWNS_FILE, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size < _SLOT.size:
                return None
            return cls(mmap.mmap(fd, size), size // _SLOT.size)
        finally:
            os.close(fd)

    def resting(self, slot: int, now: float) -> float:
        """How many more seconds deployment `slot` rests (0: it does not), at most MAX_REST."""
        if not 0 <= slot < self.slots:
            return 0.0
        until = _SLOT.unpack_from(self._view, slot * _SLOT.size)[0]
        rest = until - now
        return min(rest, MAX_REST) if rest > 0 else 0.0  # also 0 for a NaN

    def rest(self, slot: int, until: float) -> None:
        """Deployment `slot` rests until `until` (the clock's seconds), unless it already
        rests longer."""
        if 0 <= slot < self.slots:
            held = _SLOT.unpack_from(self._view, slot * _SLOT.size)[0]
            if not held >= until:
                _SLOT.pack_into(self._view, slot * _SLOT.size, until)

    def clear(self, slot: int) -> None:
        """Deployment `slot` answered: it rests no more (written only if it did)."""
        if 0 <= slot < self.slots and _SLOT.unpack_from(self._view, slot * _SLOT.size)[0]:
            _SLOT.pack_into(self._view, slot * _SLOT.size, 0.0)
