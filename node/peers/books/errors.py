"""What stops a ledger operation. Apart because every module of the books raises it, and
the CLI, the re-sync and the dashboard catch it without importing the rest."""

from __future__ import annotations

from node.errors import HubError, Kind


class BooksError(HubError):
    """What stops a ledger operation, said plainly; an OpenAI-shaped error where it reaches
    the HTTP API (admin or federation), a plain message in the CLI."""

    def __init__(self, kind: Kind, message: str) -> None:
        super().__init__(kind, message, code="ledger_error")
