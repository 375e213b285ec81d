"""Whether a process id names a live process: what a file written by a process of the node
(`served.json`, a journal segment) is checked against before it is taken as its writer's."""

from __future__ import annotations

import os


def running(pid: int) -> bool:
    """Whether some process has `pid` (ours or another user's). A pid reused since is taken
    for its writer, and a process that died but is not reaped yet still has it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True
