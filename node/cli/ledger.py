"""`aihub ledger …`: what this node owes and is owed, checked, reconciled and settled with
each peer. Works on the data folder directly and talks to peers with signed requests, like
`aihub join`; a running node sees the result through the epoch files."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.table import Table

from federation.identity import NodeIdentity
from federation.printable import printable
from node.cli.folder import cli_actor, currency_of, require_config
from node.cli.options import SINCE_HELP, parsed, with_data_dir
from node.cli.output import console, echo_json, fail, shown
from node.config import IDENTITY_FILE, store_target
from node.units import amount, parse_since

if TYPE_CHECKING:
    from node.peers.books.link import Link
    from node.peers.books.reconciliation import ReconcileReport
    from node.storage.base import Store

T = TypeVar("T")

# Each command imports the module of the books (`node.peers.books`) it runs, when it runs:
# those that talk to a peer bring the peer transport (aiohttp, httpx), and all of them the
# store and the ledger, which `aihub ledger --help` has no use for.

_since = parsed(lambda text: parse_since(text) // 1000)  # the ledger counts in seconds
json_option = click.option("--json", "json_", is_flag=True, help="Print JSON")
# The reconciliation report's buckets, in the order the table shows them.
BUCKETS = (
    "matched",
    "missing_ours",
    "missing_theirs",
    "disputed",
    "mismatched",
    "equivocation",
    "rejected",
    "unanswered",
)


def _signed_amount(micros: int, currency: str) -> str:
    return ("-" if micros < 0 else "") + amount(abs(micros), currency)


def _run(directory: Path, work: Callable[[Store, NodeIdentity], Awaitable[T]]) -> T:
    """Run `work` on the node's store with its identity; a BooksError fails the command."""
    from node.peers.books.errors import BooksError
    from node.storage import opened

    require_config(directory)
    identity = NodeIdentity.load(directory / IDENTITY_FILE)

    async def go() -> T:
        async with opened(**store_target(directory)._asdict()) as store:
            try:
                return await work(store, identity)
            except BooksError as exc:
                fail(exc.message)

    return asyncio.run(go())


def _namer(directory: Path) -> Callable[[str], str]:
    """What to call a node in what a command prints: "us", a peer's name, or (a node of the
    group we have no record of) its whole id, to compare with what its owner says."""

    async def names(store: Store, me: NodeIdentity) -> dict[str, str]:
        known = {record.node_id: printable(record.name) for record in await store.peers.peers()}
        return known | {me.node_id: "us"}

    known = _run(directory, names)
    return lambda node_id: known.get(node_id, node_id)


def _with_peer(directory: Path, peer: str, work: Callable[[Store, Link], Awaitable[T]]) -> T:
    """Run `work` with a signed link to PEER (name or node id); a network failure is a 502
    BooksError, as from the node's admin API."""
    import httpx

    from node.errors import Kind
    from node.gateway.auth import touch_epoch
    from node.peers.books.errors import BooksError
    from node.peers.books.link import link_to
    from node.peers.peering import PEERS_EPOCH_FILE

    async def go(store: Store, identity: NodeIdentity) -> T:
        async with httpx.AsyncClient(timeout=60) as client:
            link = await link_to(store, identity, client, peer)
            try:
                return await work(store, link)
            except httpx.HTTPError as exc:
                raise BooksError(Kind.PEER_FAILURE, f"{link.url}: {type(exc).__name__}") from exc

    result = _run(directory, go)
    touch_epoch(directory, PEERS_EPOCH_FILE)  # a suspended peer stops at once
    return result


def _reconciled(store: Store, link: Link) -> Awaitable[ReconcileReport]:
    from node.peers.books.reconciliation import reconcile_with
    from node.peers.receipts import keep_receipt

    async def keep(receipt: Any) -> bool:
        return await keep_receipt(store, receipt)

    return reconcile_with(store, link, keep)


@click.group("ledger")
def ledger() -> None:
    """The signed ledger: balances, verification, reconciliation, settlement."""


@ledger.command("balance")
@json_option
@with_data_dir
def balance(directory: Path, json_: bool) -> None:
    """Per peer: what each side used of the other since the last settlement, and the net
    (positive: the peer owes us)."""
    from node.peers.books.balance import balance as books_balance

    rows = _run(directory, lambda store, me: books_balance(store, me.node_id))
    if json_:
        echo_json(rows)
        return
    currency = currency_of(directory)
    table = Table(title="Balances since the last settlement")
    for column in ("peer", "we used", "they used", "net", "receipts", "unanswered"):
        table.add_column(column, justify="left" if column == "peer" else "right")
    for row in rows:
        table.add_row(
            shown(row.name),
            amount(row.we_used, currency),
            amount(row.they_used, currency),
            _signed_amount(row.net, currency),
            str(row.receipts),
            amount(row.unanswered, currency),
        )
    console.print(table)


@ledger.command("verify")
@json_option
@with_data_dir
def verify(directory: Path, json_: bool) -> None:
    """Re-verify every signature and hash link; report the first broken link of each
    chain. Exit status 1 if any is broken."""
    from node.peers.books.verify import verify as books_verify

    checks = _run(directory, lambda store, _: books_verify(store))
    if json_:
        echo_json(checks)
    else:
        for check in checks:
            pair = f"{check.provider[:16]}… → {check.consumer[:16]}…"
            if check.kind == "statement":
                pair = f"statement {check.provider[:16]}… / {check.consumer[:16]}…"
            verdict = "ok" if check.ok else f"BROKEN: {check.problem}"
            console.print(printable(f"{pair}  {check.receipts} receipts  {verdict}"), markup=False)
        if not checks:
            console.print("No receipts yet.")
    if not all(check.ok for check in checks):
        raise SystemExit(1)


@ledger.command("reconcile")
@click.argument("peer")
@json_option
@with_data_dir
def reconcile(directory: Path, peer: str, json_: bool) -> None:
    """Compare our receipts with PEER's (name or node id): recover what we miss, send what
    it misses, and report disputes, mismatches and equivocation."""
    report = _with_peer(directory, peer, _reconciled)
    if json_:
        echo_json(report)
        return
    currency = currency_of(directory)
    table = Table(title="Reconciliation")
    for column in ("", "receipts", "amount"):
        table.add_column(column, justify="left" if not column else "right")
    for label in BUCKETS:
        bucket = getattr(report, label)
        table.add_row(label.replace("_", " "), str(bucket.count), amount(bucket.amount, currency))
    console.print(table)
    if report.suspended:
        console.print("The peer signed two receipts for one seq: it is suspended.")


@ledger.command("settle")
@click.argument("peer")
@json_option
@with_data_dir
def settle(directory: Path, peer: str, json_: bool) -> None:
    """Close the period with PEER: reconcile, then a statement both nodes sign."""
    from node.peers.books.settlement import settle_with

    async def work(store: Store, link: Link) -> Any:
        await _reconciled(store, link)
        return await settle_with(store, link, cli_actor())

    statement = _with_peer(directory, peer, work)
    if json_:
        echo_json(statement)
        return
    me = NodeIdentity.load(directory / IDENTITY_FILE).node_id
    net = statement.net if me == statement.b else -statement.net
    currency = currency_of(directory)
    who = _namer(directory)
    console.print(
        f"Settled: {amount(statement.a_owes_b, currency)} owed by {who(statement.a)}, "
        f"{amount(statement.b_owes_a, currency)} by {who(statement.b)}; net for us "
        f"{_signed_amount(net, currency)}.",
        markup=False,
    )


@ledger.command("statements")
@with_data_dir
def statements(directory: Path) -> None:
    """Our settlement statements, one JSON per line (to share for `ledger net`)."""
    for body in _run(directory, lambda store, _: store.ledger.settlements()):
        click.echo(body)


@ledger.command("net")
@click.argument("files", nargs=-1, type=click.File("r"))
@json_option
@with_data_dir
def net(directory: Path, files: tuple[Any, ...], json_: bool) -> None:
    """A transfer plan that clears every balance (at most n-1 transfers), from our
    statements and those in FILES (the group's, one JSON per line)."""
    from node.peers.books.netting import net as books_net

    extra = [line for file in files for line in file.read().splitlines() if line.strip()]
    plan = _run(directory, lambda store, me: books_net(store, me.node_id, extra))
    if json_:
        echo_json(plan)
        return
    currency = currency_of(directory)
    who = _namer(directory)
    for transfer in plan.transfers:
        paid = amount(transfer.amount, currency)
        console.print(f"{who(transfer.payer)} pays {who(transfer.payee)} {paid}", markup=False)
    if not plan.transfers:
        console.print("Nothing to transfer.")


@ledger.command("export")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "json"]),
    default="csv",
    show_default=True,
    help="csv: one line per receipt, for a spreadsheet; json: the signed receipts as they are",
)
@click.option("--since", default="30d", show_default=True, callback=_since, help=SINCE_HELP)
@with_data_dir
def export(directory: Path, fmt: str, since: int) -> None:
    """Receipts for accounting, as CSV or as the signed JSON."""
    from node.peers.books.export import export as books_export

    click.echo(_run(directory, lambda store, _: books_export(store, since, fmt)), nl=False)
