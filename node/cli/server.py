"""uvicorn's server, with the log lines held for the event loop's turn written before the
process ends on a stopping signal.

After a graceful stop on SIGTERM or SIGINT, uvicorn restores the signal's previous handler and
raises the signal again, so that the process ends as the signal's default action ends it: at
once, with no interpreter exit, so neither `atexit` nor logging's shutdown runs. The node's log
handler (`TurnStreamHandler`) holds what the loop's thread logs until the end of the loop's
turn, and the last turn's lines ("Application shutdown complete.", "Finished server process")
would be lost with the process. They are written before the signal is raised again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator

from uvicorn import Server
from uvicorn.supervisors.multiprocess import Process

from node.observe.logs import write_held_lines


class LoggedServer(Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():  # raises the captured signal again as it exits
            try:
                yield
            finally:
                write_held_lines()


class LoggedWorker(Process):
    """A worker process of uvicorn's supervisor, serving with `LoggedServer`."""

    @property
    def server(self) -> Server:
        if self._server is None:
            self._server = LoggedServer(config=self.config)
        return self._server
