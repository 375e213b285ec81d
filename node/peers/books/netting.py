"""Netting: a transfer plan that clears every balance in the statements we hold and are
given. Apart because it reads statements only, and refuses those naming nodes we do not
know."""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from federation.descriptors import public_key_of
from ledger.netting import Transfer, transfer_plan
from ledger.records import RecordError
from ledger.settlement import Statement, balances, parse_statement, verify_statement
from node.errors import Kind
from node.peers.books.errors import BooksError
from node.storage.base import Store


class NetPlan(msgspec.Struct):
    balances: dict[str, int]
    transfers: list[Transfer]


async def net(store: Store, me: str, extra: Iterable[bytes | str]) -> NetPlan:
    """A transfer plan clearing every balance in our statements and in `extra` (statements of
    other pairs of the group, as JSON): at most n - 1 transfers.

    Only statements between parties we know count: two signatures prove only that two key
    pairs agreed, and anyone can make key pairs. A statement naming a node that is neither us
    nor a peer of ours (a sybil) is refused: its made-up debt would move real peers' money
    (the plan could have a real debtor pay a sybil, and the sybil "pay" the real creditor)."""
    known = await _parties(store, me)
    statements: dict[tuple[str, str, int], Statement] = {}
    for body in [*(await store.ledger.settlements()), *extra]:
        try:
            statement = parse_statement(body)
            verify_statement(statement, public_key_of(statement.a), public_key_of(statement.b))
        except (RecordError, ValueError) as exc:
            raise BooksError(Kind.INVALID_REQUEST, f"a statement is not valid: {exc}") from exc
        strangers = [node for node in (statement.a, statement.b) if node not in known]
        if strangers:
            raise BooksError(
                Kind.INVALID_REQUEST,
                f"a statement names {', '.join(strangers)}, not a peer of this node: statements"
                " between nodes we do not know are refused (netting only counts real peers)",
            )
        statements[(statement.a, statement.b, statement.iat)] = statement
    owed = balances(statements.values())
    return NetPlan(owed, transfer_plan(owed))


async def _parties(store: Store, me: str) -> set[str]:
    """Us and every node we peered with (an invite or an approved join), revoked or
    suspended ones included: their settled periods are still owed."""
    peers = await store.peers.peers(include_revoked=True)
    return {me, *(p.node_id for p in peers if p.status in ("active", "revoked", "suspended"))}
