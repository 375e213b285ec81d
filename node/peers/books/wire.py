"""What two nodes send each other about their books: the page size and the bodies of the
federation's ledger endpoints (`/federation/receipts`, `/federation/settlements`). Apart
because both sides use them: the asking side (reconciliation, re-sync, settlement) decodes
what the answering side (`served`, `settlement.countersign_statement`) encodes."""

from __future__ import annotations

import msgspec

PAGE = 1000  # receipts per page when two nodes compare their books


class ReceiptPage(msgspec.Struct):
    receipts: list[dict[str, object]]
    more: bool


class ReceiptBatch(msgspec.Struct):
    receipts: list[dict[str, object]]


class StatementBody(msgspec.Struct):
    statement: dict[str, object]
    # The proposer's last statement of the pair: a peer that lost it (say, to a restored
    # backup) keeps it first, since it carries the peer's own signature.
    previous: dict[str, object] | None = None


class StatementPage(msgspec.Struct):
    statements: list[dict[str, object]]
    more: bool
