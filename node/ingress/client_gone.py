"""How a request learns that its client went away, from the server itself.

Under `aihub serve` the connection's protocol (`node/ingress/connections.py`) puts a
`ClientGone` in each request's scope and fires it when the connection is lost before the
answer is complete: it cancels the tasks that watch for that (`node/ingress/asgi.py`
`cancelled_on_disconnect`). Where the scope has none (another server, a test's in-process
client), a watcher task waits on `receive()` for `http.disconnect` instead, as ASGI has it: a
task created, scheduled and cancelled for every request, where the protocol already knows.
"""

from __future__ import annotations

from collections.abc import Callable

CLIENT_GONE = "aihub.client_gone"


class ClientGone:
    """One request's: `watch(cancel)` calls `cancel` once the client is gone (at once if it
    already is) and returns what stops the watching.

    `resume` is the connection's `resume_reading`: the server stops reading a socket while a
    large body waits for the app, and a socket that is not read never tells that its client
    left. `receive()` resumes it; so does a watch, which replaces it."""

    __slots__ = ("_resume", "_watchers", "gone")

    def __init__(self, resume: Callable[[], None]) -> None:
        self.gone = False
        self._resume = resume
        self._watchers: list[Callable[[], None]] = []

    def watch(self, cancel: Callable[[], None]) -> Callable[[], None]:
        if self.gone:
            cancel()
            return _nothing
        self._resume()
        self._watchers.append(cancel)
        return lambda: self._unwatch(cancel)

    def fire(self) -> None:
        self.gone = True
        watchers, self._watchers = self._watchers, []
        for cancel in watchers:
            cancel()

    def _unwatch(self, cancel: Callable[[], None]) -> None:
        if cancel in self._watchers:
            self._watchers.remove(cancel)


def _nothing() -> None:
    pass
