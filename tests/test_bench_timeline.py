"""bench/hop_timeline.py's reading of a capture: each request's crossings in order, the gaps
between them named for whose work they hold, and a request that missed a crossing left out
(a packet lost to the capture's start, an answer still in flight at its end)."""

from __future__ import annotations

import pytest

from bench.hop_timeline import HOP_GAPS, HOP_MARKS, gaps, requests


def _request(start: float, steps: list[float]) -> list[tuple[float, str]]:
    """One hop request's packets: the client's request in two packets (head, then body), then
    one packet a crossing, `steps` seconds apart."""
    packets = [(start, HOP_MARKS[0]), (start + 0.0001, HOP_MARKS[0])]
    when = start + 0.0001
    for mark, step in zip(HOP_MARKS[1:], steps, strict=True):
        when += step
        packets.append((when, mark))
    return packets


def test_each_gap_is_the_time_from_one_crossing_to_the_next() -> None:
    steps = [0.0004, 0.0006, 0.0002, 0.0005, 0.0003]
    found = _request(1.0, steps) + _request(2.0, steps) + _request(3.0, steps)
    times = requests(found, HOP_MARKS)
    assert len(times) == 2  # the last one's end is not seen: it is still open
    figures = gaps(times, HOP_GAPS)
    for name, step in zip(HOP_GAPS, steps, strict=True):
        assert figures[name] == pytest.approx(step * 1e6)
    assert figures["whole, first packet in to last out"] == pytest.approx(
        (0.0001 + sum(steps)) * 1e6
    )


def test_a_request_that_missed_a_crossing_is_left_out() -> None:
    steps = [0.0004, 0.0006, 0.0002, 0.0005, 0.0003]
    broken = [p for p in _request(2.0, steps) if p[1] != "mock > alpha"]
    found = _request(1.0, steps) + broken + _request(3.0, steps) + _request(4.0, steps)
    times = requests(found, HOP_MARKS)
    assert [round(t[0]) for t in times] == [1, 3]
