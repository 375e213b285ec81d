"""Run a module under a watch on the garbage collector: the CPU each generation's collections
took (the thread's CPU time, so a preempted collection is not counted as the machine's
slowness), their count and the longest, written every 2 s to `$GC_WATCH_DIR/gc.PID.json`.

    python bench/gc_watch.py -m node.cli serve ...

As a node's interpreter in `bench.ab` (a path, so that it runs from either build's tree):

    python -m bench.ab --base HEAD~1 --python-a "python $PWD/bench/gc_watch.py" \\
        --python-b "python $PWD/bench/gc_watch.py"
"""

from __future__ import annotations

import gc
import json
import os
import runpy
import sys
import threading
import time
from pathlib import Path

WRITE_EVERY_SECONDS = 2.0


class Watch:
    def __init__(self) -> None:
        self.started = 0.0
        # generation -> [collections, CPU seconds, longest]
        self.seen = {generation: [0, 0.0, 0.0] for generation in range(3)}

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.thread_time()
            return
        took = time.thread_time() - self.started
        counts = self.seen[info["generation"]]
        counts[0] += 1
        counts[1] += took
        counts[2] = max(counts[2], took)

    def report(self) -> dict[str, object]:
        return {
            "pid": os.getpid(),
            "frozen": gc.get_freeze_count(),
            "tracked": len(gc.get_objects()),
            "generations": {
                str(generation): {"collections": n, "cpu_ms": cpu * 1000, "longest_ms": most * 1000}
                for generation, (n, cpu, most) in self.seen.items()
            },
        }


def _write_forever(watch: Watch, folder: Path) -> None:
    # The node is stopped with a signal that does not run atexit handlers in its workers.
    while True:
        time.sleep(WRITE_EVERY_SECONDS)
        (folder / f"gc.{os.getpid()}.json").write_text(json.dumps(watch.report()))


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        raise SystemExit(__doc__)
    folder = Path(os.environ.get("GC_WATCH_DIR", "/tmp/gc-watch"))
    folder.mkdir(parents=True, exist_ok=True)
    watch = Watch()
    gc.callbacks.append(watch)
    threading.Thread(target=_write_forever, args=(watch, folder), daemon=True).start()
    # As `python -m` would: the working folder first, not this script's (bench/profile.py
    # would stand in for the standard library's profile).
    sys.path[0] = os.getcwd()
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
