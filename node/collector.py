"""The cyclic garbage collector, settled for a long-running server once the node has started.

A started node holds ~100,000 long-lived objects (the app, its routes and schemas, the config,
the libraries' module state), and every full collection walks them all again: under the
bench's load, 8 full collections in ~17,000 requests, up to 80 ms of CPU each, every one
a pause of the event loop and so of every request in flight. CPython's default young
threshold (700 new container objects) also collects the young generation every few requests,
each time walking what the requests in flight hold. `gc.freeze()` moves what exists at the end
of startup to the permanent generation, which no collection walks; a young threshold of 10,000
collects about a fifth as often. Measured with `bench/gc_watch.py` under `python -m bench.ab`
(bench/README.md): the collector's CPU over the same run fell from 1,112 ms to 106 ms (plus
the one collection at startup), the node's CPU a request 0.82x.

Garbage with cycles is still collected, only in larger batches; what the requests make is
freed by reference counting as before, whatever the thresholds. The price: a frozen object
that later becomes garbage inside a cycle is never collected, which is why only what startup
made, and lives as long as the process, is frozen.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000
# Collections of the middle and old generations, counted in collections of the one below:
# with the startup objects frozen, what reaches the old generation is what requests left
# behind, so it is walked a tenth as often as CPython's default.
MIDDLE_THRESHOLD = 20
OLD_THRESHOLD = 100


def settle_collector() -> int:
    """Collect once, freeze what is left and raise the thresholds; returns what was frozen."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, OLD_THRESHOLD)
    return gc.get_freeze_count()
