"""The data folder's epoch files (`keys.epoch`, `peers.epoch`): how every process serving a
node hears at once that keys or peers changed.

An epoch file holds one 8-byte number, rewritten in place (never replaced) by whoever changes
what it stands for, after the change is committed. A reader that checks on every request
maps the file (`EpochView`) and reads the number from memory: the page is the kernel's page
cache, shared by every process that maps or writes the file, so a write by the admin API,
the CLI or another worker is seen by the very next read, without a system call. The `stat`
per request it replaces cost ~2 µs warm, and several times that at 100 requests a second,
where each request runs from cold caches (bench/README.md, issue 20).

The write also moves the file's mtime, which readers that check rarely (`read_epoch`, once a
second) compare instead.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from pathlib import Path

EPOCH_FILE = "keys.epoch"
_NUMBER = struct.Struct("<Q")


def touch_epoch(directory: Path, name: str = EPOCH_FILE) -> None:
    """Tell every process serving this node that keys (or, by name, peers) changed: the
    number in the file moves to a value it never held (the clock's nanoseconds, or one past
    the last if the clock is behind), in place, so that a mapped view sees it."""
    fd = os.open(directory / name, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        held = os.pread(fd, _NUMBER.size, 0)
        last = _NUMBER.unpack(held)[0] if len(held) == _NUMBER.size else 0
        # One pwrite of 8 bytes: a reader sees the old number or the new one (a torn read
        # would only be another number, which makes it reload once more, never miss it).
        os.pwrite(fd, _NUMBER.pack(max(time.time_ns(), last + 1) % (1 << 64)), 0)
    finally:
        os.close(fd)


def read_epoch(path: Path | str) -> int:
    """When keys (or peers) last changed: the epoch file's mtime, 0 if never (one `stat`;
    `EpochView` reads without one)."""
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return 0


class EpochView:
    """An epoch file mapped into memory, read without a system call.

    The file is created (8 zero bytes) if it does not exist yet, so that there is a page to
    map before anyone changes anything. A file replaced under the view (deleted and made
    anew, or restored from a backup) is another page: `remap` (the heartbeat, once a second)
    maps the new one, and until then a change still reaches this process through the store's
    epoch at that heartbeat."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self._map: mmap.mmap | None = None
        self._inode = (-1, -1)
        self.remap()

    def remap(self) -> None:
        """Map the file at the path, if it is not the one mapped (one `open` and `fstat`)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            info = os.fstat(fd)
            if (info.st_dev, info.st_ino) == self._inode:
                return
            if info.st_size < _NUMBER.size:
                # Never shorter than the map: reading past a file's end is a SIGBUS.
                os.ftruncate(fd, _NUMBER.size)
            mapped = mmap.mmap(fd, _NUMBER.size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        old, self._map, self._inode = self._map, mapped, (info.st_dev, info.st_ino)
        if old is not None:
            old.close()

    def read(self) -> int:
        """The number the file holds now."""
        assert self._map is not None
        return _NUMBER.unpack_from(self._map)[0]
