"""The epoch files: a change written by another process is read at once from the mapped
view, without a system call per read (node/gateway/epochs.py). The servers' side, a key
revoked through one worker's folder and refused by the other on its next request, is
tests/test_multiprocess.py's `test_keys_changed_are_honoured_by_the_other_worker_on_sqlite`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from node.gateway.epochs import EPOCH_FILE, EpochView, read_epoch, touch_epoch


def _touch_elsewhere(folder: Path, times: int = 1) -> None:
    """`touch_epoch`, as another process (the CLI, another worker) calls it."""
    code = (
        "import sys; from pathlib import Path; from node.gateway.epochs import touch_epoch\n"
        f"for _ in range({times}): touch_epoch(Path(sys.argv[1]))"
    )
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True)


def test_a_change_made_by_another_process_is_read_at_once(tmp_path: Path) -> None:
    view = EpochView(tmp_path / EPOCH_FILE)  # before the file exists: made, 0
    assert view.read() == 0 and (tmp_path / EPOCH_FILE).stat().st_size == 8
    seen = [view.read()]
    for times in (1, 1, 3):
        _touch_elsewhere(tmp_path, times)
        seen.append(view.read())  # the same mapping: nothing re-read, re-opened or re-mapped
    assert len(set(seen)) == len(seen)


def test_each_change_is_a_number_the_file_never_held_even_with_the_clock_behind(
    tmp_path: Path,
) -> None:
    path = tmp_path / EPOCH_FILE
    path.write_bytes((2**63).to_bytes(8, "little"))  # far past the clock
    view = EpochView(path)
    held = {view.read()}
    for _ in range(50):
        touch_epoch(tmp_path)
        assert view.read() not in held
        held.add(view.read())


def test_a_change_moves_the_mtime_too(tmp_path: Path) -> None:
    """Readers that check once a second (`read_epoch`: peers, adverts) compare the mtime."""
    touch_epoch(tmp_path)
    os.utime(tmp_path / EPOCH_FILE, ns=(0, 0))
    touch_epoch(tmp_path)
    assert read_epoch(tmp_path / EPOCH_FILE) > 0


def test_an_epoch_file_of_the_old_format_is_read_and_changed(tmp_path: Path) -> None:
    """A data folder from before: the file held the time as text, replaced at each change."""
    path = tmp_path / EPOCH_FILE
    path.write_text("1764650000000000000")
    view = EpochView(path)
    before = view.read()
    _touch_elsewhere(tmp_path)
    assert view.read() != before


def test_a_file_replaced_under_the_view_is_mapped_anew_by_remap(tmp_path: Path) -> None:
    path = tmp_path / EPOCH_FILE
    view = EpochView(path)
    replacement = tmp_path / "new"
    replacement.write_bytes(b"\x07" * 8)
    os.replace(replacement, path)  # a restore from a backup, or a writer of the old code
    assert view.read() == 0  # the old page: what the heartbeat's remap is for
    view.remap()
    assert view.read() == int.from_bytes(b"\x07" * 8, "little")
    _touch_elsewhere(tmp_path)
    assert view.read() != int.from_bytes(b"\x07" * 8, "little")
