"""Our books checked on their own, without the peer: every signature and link of every
chain, then every settlement statement against the receipts of its period. Apart because
it only reads our own books, and is the longest of the local checks."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import msgspec

from federation.descriptors import public_key_of
from ledger.chain import verify_chain
from ledger.receipts import GENESIS
from ledger.records import RecordError
from ledger.settlement import (
    Statement,
    open_periods,
    parse_statement,
    period_statement,
    same_statement,
    verify_statement,
)
from node.peers.books.period import settled_seqs, stored_pages
from node.peers.receipts import loaded
from node.storage.base import Store
from node.storage.records import StoredReceipt, body_hash


class ChainCheck(msgspec.Struct):
    """One chain (provider → consumer), or one settlement statement (`kind`; then provider
    and consumer are its `a` and `b`, and `receipts` those of its period)."""

    provider: str
    consumer: str
    receipts: int
    ok: bool
    problem: str | None
    kind: str = "chain"


async def verify(store: Store) -> list[ChainCheck]:
    """Every signature and every link of every chain we hold, the first broken link of each;
    then every settlement statement: both signatures, and its heads and totals against the
    receipts of its period in our chains."""
    checks = [
        await _check_chain(store, provider, consumer)
        for provider, consumer in sorted(await store.ledger.receipt_pairs())
    ]
    pairs = {tuple(sorted(pair)) for pair in await store.ledger.receipt_pairs()}
    for body in await store.ledger.settlements():
        try:
            statement = parse_statement(body)
        except RecordError:
            continue  # named below, under its pair, if it is one of ours
        pairs.add((statement.a, statement.b))
    for a, b in sorted(pairs):
        checks += await _verify_statements(store, a, b)
    return checks


async def _check_chain(store: Store, provider: str, consumer: str) -> ChainCheck:
    """One chain, a page at a time, each page checked to continue the last. What is named,
    as for the whole chain at once: a receipt that cannot be read, else the first broken
    link, else the first row whose `hash` column is not its body's."""
    count, head = 0, (0, GENESIS)
    unreadable = broken = column = None
    keys = public_key_of(provider), public_key_of(consumer)
    async for rows in stored_pages(store, provider, consumer):
        offset, count = count, count + len(rows)
        if unreadable is not None:
            continue  # counted, not checked: the chain is not in order past it anyway
        try:
            receipts = [loaded(row) for row in rows]
        except RecordError as exc:
            unreadable = f"unreadable: {exc}"
            continue
        if broken is None:
            report = verify_chain(receipts, *keys, start_seq=head[0] + 1, start_prev=head[1])
            if report.ok:
                head = report.head
            else:
                broken = str(dataclasses.replace(report, index=offset + (report.index or 0)))
        column = column or _hash_column_problem(rows)
    problem = unreadable or broken or column
    return ChainCheck(provider, consumer, count, problem is None, problem)


def _hash_column_problem(rows: list[StoredReceipt]) -> str | None:
    """The `hash` column is derived from the body: name a row where it is not (the chain
    itself is checked from the bodies, and links are always recomputed from them)."""
    for row in rows:
        if row.hash != body_hash(row.body):
            return f"seq {row.seq}: the stored hash column is not the hash of its receipt"
    return None


async def _verify_statements(store: Store, a: str, b: str) -> list[ChainCheck]:
    """Each statement of the pair (a, b), in the order they cover the chains: both
    signatures, and exactly the totals and heads our receipts of its period give (read a
    page at a time)."""
    checks, statements = [], []
    for body in await store.ledger.settlements(a, b):
        try:
            statement = parse_statement(body)
            verify_statement(statement, public_key_of(a), public_key_of(b))
        except RecordError as exc:
            checks.append(ChainCheck(a, b, 0, False, f"a statement: {exc}", kind="statement"))
            continue
        statements.append(statement)
    settled = await settled_seqs(store, a, b, statements)
    valid = [(s.to_seq, seq, s.iat, s) for s, seq in zip(statements, settled, strict=True)]
    previous: Statement | None = None
    ab_from = ba_from = 0
    for ab_to, ba_to, _, statement in sorted(valid, key=lambda item: item[:3]):
        span = Span((ab_from, ab_to), (ba_from, ba_to))
        problem, count = await _check_period(store, statement, previous, span)
        checks.append(ChainCheck(a, b, count, problem is None, problem, kind="statement"))
        previous, ab_from, ba_from = statement, ab_to, ba_to
    return checks


async def _check_period(
    store: Store, statement: Statement, previous: Statement | None, span: Span
) -> tuple[str | None, int]:
    """What is wrong with one statement against our receipts of its period, if anything,
    and how many receipts the period holds."""
    a, b = statement.a, statement.b
    count, broken = 0, None
    try:
        a_to_b, b_to_a = open_periods(a, b, previous=previous)
    except ValueError as exc:
        where = f"statement of seq {statement.from_seq}..{statement.to_seq}"
        return f"{where}: cannot check the statement: {exc}", 0
    for provider, consumer, period, (after, upto) in (
        (a, b, a_to_b, span.a_to_b),
        (b, a, b_to_a, span.b_to_a),
    ):
        async for rows in stored_pages(store, provider, consumer, after=after):
            inside = [row for row in rows if row.seq <= upto]
            count += len(inside)
            if broken is None:
                try:
                    period.add([loaded(row) for row in inside])
                except (ValueError, RecordError) as exc:
                    broken = str(exc)
            if rows[-1].seq >= upto:
                break
    try:
        if broken is not None:
            raise ValueError(broken)
        same_statement(statement, period_statement(a_to_b, b_to_a, a, b, now=statement.iat))
        return None, count
    except ValueError as exc:
        problem = f"cannot check the statement: {exc}"
    except RecordError as exc:
        problem = str(exc)
    return f"statement of seq {statement.from_seq}..{statement.to_seq}: {problem}", count


class Span(NamedTuple):
    """A statement's period: the seqs (after, up to) of each chain it covers."""

    a_to_b: tuple[int, int]
    b_to_a: tuple[int, int]
