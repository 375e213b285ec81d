"""Settlement: closing a period with a peer. Both sides of it: proposing a statement
(`settle_with`) and countersigning one (`countersign_statement`), and keeping the
both-signed statements, including those the peer still holds and we lost
(`recover_statements`). Apart because a statement is signed here and nowhere else."""

from __future__ import annotations

import msgspec

from federation.descriptors import public_key_of
from federation.identity import NodeIdentity
from ledger.nesting import bounded
from ledger.records import MAX_SKEW, RecordError, verify_fields
from ledger.settlement import (
    Statement,
    parse_statement,
    same_statement,
    sign_statement,
    verify_statement,
)
from node.errors import Kind
from node.peers import audit
from node.peers.books.errors import BooksError
from node.peers.books.link import REFUSALS, Link, answered, decoded
from node.peers.books.period import last_statement, open_period
from node.peers.books.wire import StatementBody, StatementPage
from node.storage.base import Store


async def settle_with(store: Store, link: Link, actor: str | None = None) -> Statement:
    """Close the period with the peer: a statement of both chains since the last one, signed
    by us, countersigned by the peer after it checked the totals against its own books. The
    settlement is audited as `ledger.settle`, naming `actor` (who asked for it)."""
    me, peer = link.identity.node_id, link.peer.node_id
    # A statement the peer countersigned but whose answer we never got (or that a restored
    # backup lost) is where this period starts, not a reason to disagree.
    await recover_statements(store, link)
    period = await open_period(store, me, peer)
    if period.previous is not None and period.empty:
        return period.previous  # nothing since: settling again is the statement we have
    period.check_billed()
    try:
        statement = period.statement()
    except ValueError as exc:
        raise BooksError(
            Kind.CONFLICT, f"our books with this peer are not in order: {exc}"
        ) from exc
    side = "a" if me == period.a else "b"
    ours = sign_statement(statement, link.identity.sign, side)
    previous = msgspec.to_builtins(period.previous) if period.previous is not None else None
    body = msgspec.json.encode(StatementBody(msgspec.to_builtins(ours), previous))
    answer = answered(await link.post("/federation/settlements", body), "the settlement")
    try:
        both = parse_statement(msgspec.json.decode(bounded(answer), type=StatementBody).statement)
        verify_statement(both, public_key_of(both.a), public_key_of(both.b))
    except (RecordError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BooksError(
            Kind.PEER_FAILURE, f"the peer's countersigned statement is not valid: {exc}"
        ) from exc
    if not same_period(both, statement):
        raise BooksError(Kind.PEER_FAILURE, "the peer signed a different statement")
    # The peer may answer with the statement it signed for this period before (its `iat`).
    await save_statement(store, both)
    await audit.record(
        store,
        actor,
        "ledger.settle",
        peer,
        from_seq=both.from_seq,
        to_seq=both.to_seq,
        a_owes_b=both.a_owes_b,
        b_owes_a=both.b_owes_a,
    )
    return both


def same_period(one: Statement, other: Statement) -> bool:
    """Two statements of one period with the same totals, whenever (`iat`) and by whom they
    were signed: settling a period again is answered with the statement already signed."""
    unsigned = {"iat": 0, "sig_a": "", "sig_b": ""}
    return msgspec.structs.replace(one, **unsigned) == msgspec.structs.replace(other, **unsigned)


def _ours(body: object, me: str, peer: str) -> Statement | None:
    """A statement between us carrying both signatures (ours among them), or None."""
    try:
        statement = parse_statement(body)  # type: ignore[arg-type]
        if {statement.a, statement.b} != {me, peer}:
            return None
        verify_statement(statement, public_key_of(statement.a), public_key_of(statement.b))
    except (RecordError, ValueError, TypeError):
        return None
    return statement


async def recover_statements(store: Store, link: Link) -> int:
    """Keep the statements of our pair that the peer holds and we do not (newer than our
    last): each bears our own signature, so it is ours whatever the peer is. How many."""
    me, peer = link.identity.node_id, link.peer.node_id
    last = await last_statement(store, me, peer)
    # From a little before our last: the two nodes' clocks (each proposer's `iat`) may differ.
    after = last.iat - 2 * MAX_SKEW if last is not None else -1
    kept = 0
    while True:
        response = await link.get(f"/federation/settlements?after_iat={after}")
        if response.status_code in REFUSALS:
            return kept  # a node older than statement recovery
        page = decoded(answered(response, "statements"), StatementPage)
        for body in page.statements:
            statement = _ours(body, me, peer)
            if statement is not None:
                kept += await save_statement(store, statement)
        if not page.more or not page.statements:
            return kept
        newest = max((s.get("iat") for s in page.statements), key=_as_int)
        if _as_int(newest) <= after:
            return kept  # a page that does not advance: stop rather than loop
        after = _as_int(newest)


def _as_int(value: object) -> int:
    return value if type(value) is int else -1


async def save_statement(store: Store, statement: Statement) -> bool:
    """Keep a both-signed statement; False if we held it already."""
    body = msgspec.json.encode(msgspec.to_builtins(statement)).decode()
    return await store.ledger.add_settlement(
        statement.a, statement.b, statement.to_seq, statement.iat, body
    )


async def countersign_statement(
    store: Store, identity: NodeIdentity, peer: str, body: bytes
) -> Statement:
    """A peer proposes to close the period: sign it only if our own books give the very same
    statement, and keep it. A period we signed already is answered with that statement
    (a lost answer is asked again), and the proposer's previous statement, ours too, is kept
    first if we lost it."""
    me = identity.node_id
    try:
        request = msgspec.json.decode(body, type=StatementBody)
        proposed = parse_statement(request.statement)
    except (RecordError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BooksError(Kind.INVALID_REQUEST, f"not a settlement statement: {exc}") from exc
    if {proposed.a, proposed.b} != {me, peer}:
        raise BooksError(Kind.REFUSED, "a statement between us only")
    their_side = "a" if peer == proposed.a else "b"
    try:
        verify_statement_side(proposed, their_side)
    except RecordError as exc:
        raise BooksError(Kind.CONFLICT, f"our books disagree: {exc}") from exc
    a, b = min(me, peer), max(me, peer)
    for body in await store.ledger.settlements(a, b):
        held = _ours(body, me, peer)
        if held is not None and same_period(held, proposed):
            return held
    previous = _ours(request.previous, me, peer) if request.previous is not None else None
    if previous is not None:
        await save_statement(store, previous)
    period = await open_period(store, me, peer)
    period.check_billed()
    try:
        same_statement(proposed, period.statement(now=proposed.iat))
    except ValueError as exc:
        raise BooksError(
            Kind.CONFLICT, f"our books disagree: cannot check the statement: {exc}"
        ) from exc
    except RecordError as exc:
        raise BooksError(Kind.CONFLICT, f"our books disagree: {exc}") from exc
    both = sign_statement(proposed, identity.sign, "b" if their_side == "a" else "a")
    await save_statement(store, both)
    return both


def verify_statement_side(statement: Statement, side: str) -> None:
    """The proposer's own signature on its side of a statement."""
    fields = msgspec.to_builtins(statement)
    node = statement.a if side == "a" else statement.b
    verify_fields(fields, public_key_of(node), f"sig_{side}")
