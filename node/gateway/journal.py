"""The usage journal: each finished request's charge appended to a file the moment it is
queued, so that batching the database writes (every 50 ms) loses nothing to a crash.

A `write(2)` to a file survives the process being killed: the kernel holds the data, the same
promise as SQLite's `synchronous=NORMAL` that every commit of this node relies on. A segment
that has grown past `SEGMENT_BYTES` is deleted once the batch that sealed it is committed. Each
process appends to segments of its own (named by its pid); `serve` replays whatever segments are
left, before any worker starts, and while the node serves, a worker replays those of a worker
that died (killed, or out of memory) and was replaced (`adopt_orphans`): what it had answered
is in the books within seconds, not at the node's next start.
Replaying is idempotent: a usage record already in the database is skipped, and so is the
spend it settled (`store.usage.write_batch`).

Frames are length- and CRC-prefixed: a write torn by a crash (or a machine crash that lost
part of the page cache) ends a segment's replay instead of corrupting it. A whole frame that
does not decode, or a record the database refuses (numbers out of range, say, from a version
that trusted an upstream's counts), is skipped and reported, never allowed to stop the node
from starting; a segment that had one is kept aside as `*.rejected` for a human to look at.
Audit events are not journaled: they have no identity to make a replay idempotent, and are
best-effort already.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import msgspec

from node.pids import running
from node.storage.base import Store
from node.storage.records import AuditEvent, Charge, now_ms

log = logging.getLogger("aihub.journal")

JOURNAL_DIR = "journal"
SUFFIX = ".journal"
SEGMENT_BYTES = 1 << 20  # about 5,000 requests' charges
_FRAME = struct.Struct("<II")  # payload length, CRC-32 of the payload
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Charge)
REJECTED = ".rejected"
# What a record can make the database refuse, as opposed to the database being unavailable:
# an integer past SQLite's 64 bits, a value of the wrong type, a broken constraint.
UNAPPLIABLE = (OverflowError, TypeError, ValueError, sqlite3.IntegrityError, sqlite3.InterfaceError)


class Journal:
    """This process's segments: one open for appends, and those sealed for a batch that is
    being written to the database."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(mode=0o700, exist_ok=True)
        self.folder = folder
        self._number = 0
        self._fd = -1
        self._path = folder / "unopened"
        self._written = 0
        self._sealed: list[Path] = []
        self._open()

    def _open(self) -> None:
        self._number += 1
        self._path = self.folder / f"{os.getpid()}-{self._number}{SUFFIX}"
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._written = 0

    def append(self, charge: Charge) -> None:
        payload = _encoder.encode(charge)
        self._written += os.write(
            self._fd, _FRAME.pack(len(payload), zlib.crc32(payload)) + payload
        )

    def seal(self) -> None:
        """What was appended so far is about to be written to the database. Once the segment
        is large, later appends go to a new one, and this one is deleted when the batch is
        committed. A smaller one stays open: what it holds that is already in the database is
        skipped by a replay, and a file per batch (20 a second) would cost more than that."""
        if self._written >= SEGMENT_BYTES:
            os.close(self._fd)
            self._sealed.append(self._path)
            self._open()

    def committed(self) -> None:
        """Everything in the sealed segments is in the database now."""
        for path in self._sealed:
            path.unlink(missing_ok=True)
        self._sealed.clear()

    def close(self) -> None:
        """At a clean stop, after the last batch was committed: nothing is left to replay."""
        os.close(self._fd)
        self._path.unlink(missing_ok=True)


class Segment(msgspec.Struct):
    """One segment left behind: what it holds, and how many frames in it did not decode."""

    path: Path
    charges: list[Charge]
    undecodable: int = 0


def read_segment(path: Path) -> Iterator[Charge | None]:
    """The charges of one segment, up to the first frame that is torn or corrupt; None
    for a whole frame (its checksum good) that does not decode, which is skipped."""
    data = path.read_bytes()
    offset = 0
    while offset + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, offset)
        payload = data[offset + _FRAME.size : offset + _FRAME.size + length]
        if len(payload) < length or zlib.crc32(payload) != crc:
            log.warning("journal %s: torn or corrupt at byte %d; the rest is lost", path, offset)
            return
        try:
            yield _decoder.decode(payload)
        except msgspec.DecodeError:
            log.warning("journal %s: undecodable record at byte %d, skipped", path, offset)
            yield None
        offset += _FRAME.size + length


def _segment(path: Path) -> Segment:
    held = list(read_segment(path))
    kept = [charge for charge in held if charge is not None]
    return Segment(path, kept, len(held) - len(kept))


def left_behind(folder: Path) -> list[Segment]:
    """The segments in `folder` and what they hold, oldest process first."""
    paths = sorted(folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []
    return [_segment(path) for path in paths]


async def apply(store: Store, charges: list[Charge]) -> list[tuple[Charge, str]]:
    """Write charges in one transaction; if the database refuses one, each on its own,
    so that one bad record costs only itself. Those refused, with why."""
    try:
        await store.usage.write_batch(charges, [])
        return []
    except UNAPPLIABLE:
        pass
    refused = []
    for charge in charges:
        try:
            await store.usage.write_batch([charge], [])
        except UNAPPLIABLE as exc:
            refused.append((charge, f"{type(exc).__name__}: {exc}"[:200]))
    return refused


def skipped_event(where: str, refused: list[tuple[Charge, str]], undecodable: int) -> AuditEvent:
    """The audit event that reports records skipped (a few of their ids, and why)."""
    ids = ",".join(charge.record.request_id[:64] for charge, _ in refused[:10])
    reason = refused[0][1] if refused else "undecodable"
    return AuditEvent(
        now_ms(),
        "usage.skipped",
        target=where,
        detail={"records": len(refused) + undecodable, "ids": ids, "reason": reason},
    )


async def replay(store: Store, segments: list[Segment]) -> int:
    """Write what segments left behind by a crash hold (`left_behind`), then delete them; how
    many records were replayed. A record that cannot be applied is skipped and reported (the
    log and the audit log), and its segment kept as `*.rejected`. Call it when the processes
    that wrote the segments have ended (a live one's batch may be writing them meanwhile)."""
    charges = [charge for segment in segments for charge in segment.charges]
    refused = await apply(store, charges) if charges else []
    undecodable = sum(segment.undecodable for segment in segments)
    if charges:
        log.warning("replayed %d usage records from a crash's journal", len(charges) - len(refused))
    if refused or undecodable:
        for charge, reason in refused:
            log.error("journal: skipped usage record %s: %s", charge.record.request_id, reason)
        log.error(
            "journal: %d records could not be applied and were skipped", len(refused) + undecodable
        )
        await store.usage.write_batch([], [skipped_event("journal", refused, undecodable)])
    bad = {id(charge) for charge, _ in refused}
    for segment in segments:
        if segment.undecodable or any(id(s) in bad for s in segment.charges):
            segment.path.rename(segment.path.with_suffix(REJECTED))
        else:
            segment.path.unlink()
    return len(charges) - len(refused)


def _writer(path: Path) -> int | None:
    """The pid that names a segment (`PID-N.journal`, or `PID-xPID-N.journal` once adopted)."""
    head = path.name.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def orphaned(folder: Path) -> list[Path]:
    """The segments in `folder` whose writer has ended, ours excepted. A pid some process
    has is taken for the writer's (`running`): a reused one's segments wait for the node's
    next start, as before; a writer not reaped yet is seen on a later look."""
    me = os.getpid()
    paths = sorted(folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []
    return [path for path in paths if (pid := _writer(path)) not in (None, me) and not running(pid)]


def _adopted(path: Path) -> Path | None:
    """The segment renamed to ours, the claim that makes one process replay it when several
    look at once (a rename is atomic: the others find it gone). If we end before it is
    replayed, it is an orphan of ours, for another process or the next start."""
    mine = path.with_name(f"{os.getpid()}-x{path.name}")
    try:
        path.rename(mine)
    except FileNotFoundError:
        return None
    return mine


async def adopt_orphans(store: Store, folder: Path) -> int:
    """Replay the segments of this folder's processes that ended while the node serves (a
    worker killed; its replacement runs under another pid): how many records were written.
    Its batch in memory is lost with it; its segments hold every charge it had answered.
    Replaying is idempotent, and a hold of a process whose holds were given back counts its
    spend only (`store.usage.write_batch`), whichever of the two comes first."""
    claimed = [mine for path in orphaned(folder) if (mine := _adopted(path)) is not None]
    return await replay(store, [_segment(path) for path in claimed]) if claimed else 0
