"""`python -m bench.scale.reconcile [--receipts 1000000] [--page 1000]`: how long a pair with a
long chain takes to reconcile, and the memory it takes (bench/README.md has the numbers).

Two SQLite stores, alice's and bob's, hold the same chain alice → bob of `--receipts`
countersigned receipts (`chains.py`, written straight into the files); bob reconciles with
alice through `InProcessPeer`: alice's pages made by the very functions her federation routes
call (`books.served.receipts_page`, encoded as JSON, decoded by bob as from the wire), without the
HTTP around them. Printed: the time and CPU time, the peak RSS of the process, and with
`--trace` the peak of tracemalloc (slower: every allocation is traced).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx

from bench.scale import chains
from federation.identity import NodeIdentity
from ledger.receipts import Receipt
from node.peers.books.link import Link, PeerAnswer
from node.peers.books.reconciliation import ReconcileReport, reconcile_with
from node.peers.books.served import receipts_page, statements_page
from node.peers.books.wire import PAGE
from node.storage import open_store
from node.storage.base import Store
from node.storage.records import PeerRecord


@dataclass
class InProcessPeer(Link):
    """A link to a peer whose books are `books_of_peer`, answered in this process by the
    functions its federation routes call: the same pages, without HTTP."""

    books_of_peer: Store | None = None

    async def _ask(self, method: str, path: str, body: bytes = b"") -> PeerAnswer:
        if self.books_of_peer is None or method != "GET":
            raise ValueError("an in-process peer answers its ledger pages only")
        me, peer = self.identity.node_id, self.peer.node_id
        query = {name: values[0] for name, values in parse_qs(urlsplit(path).query).items()}
        if path.startswith("/federation/receipts"):
            after, limit = int(query["after_seq"]), int(query.get("limit", PAGE))
            content = await receipts_page(
                self.books_of_peer, peer, me, query["provider"], after, limit
            )
        else:
            content = await statements_page(self.books_of_peer, peer, me, int(query["after_iat"]))
        return PeerAnswer(200, content)


@dataclass
class Pair:
    """Bob's store, and his link to alice's: the same chain alice → bob in both."""

    bob: Store
    alice: Store
    link: InProcessPeer

    async def close(self) -> None:
        await self.link.client.aclose()
        await self.bob.close()
        await self.alice.close()


async def open_pair(folder: Path, receipts: int) -> Pair:
    """Two stores in `folder` holding one chain of `receipts` (written once, then the file
    copied: both sides hold the same bytes)."""
    alice, bob = NodeIdentity.generate(), NodeIdentity.generate()
    first = await open_store(folder / "alice.db")  # migrated
    await first.close()
    chains.write(folder / "alice.db", chains.chain(alice.node_id, bob.node_id, receipts))
    shutil.copyfile(folder / "alice.db", folder / "bob.db")
    alice_store, bob_store = (
        await open_store(folder / "alice.db"),
        await open_store(folder / "bob.db"),
    )
    record = PeerRecord(alice.node_id, "alice", "{}", "active", 0)
    link = InProcessPeer(bob, httpx.AsyncClient(), record, "", None, alice_store)
    return Pair(bob_store, alice_store, link)


async def _nothing_missing(receipt: Receipt) -> bool:
    raise AssertionError("both sides hold the same chain: nothing is missing")


async def reconciled(pair: Pair, page: int) -> ReconcileReport:
    return await reconcile_with(pair.bob, pair.link, _nothing_missing, page=page)


async def run(receipts: int, page: int, trace: bool) -> None:
    folder = Path(tempfile.mkdtemp(prefix="aihub-reconcile-"))
    try:
        started = time.monotonic()
        pair = await open_pair(folder, receipts)
        print(f"wrote {receipts:,} receipts into both stores in {time.monotonic() - started:.1f} s")
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if trace:
            tracemalloc.start()
        started, cpu = time.monotonic(), time.process_time()
        try:
            report = await reconciled(pair, page)
        finally:
            elapsed, cpu = time.monotonic() - started, time.process_time() - cpu
            peak = tracemalloc.get_traced_memory()[1] if trace else 0
            tracemalloc.stop()
            await pair.close()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"reconciled: {report.matched.count:,} matched, in sync: {_in_sync(report)}")
        print(f"time: {elapsed:.1f} s ({receipts / elapsed:,.0f} receipts/s), page {page}")
        # On a shared machine the wall time is mostly waiting: the CPU time is the cost.
        print(f"CPU: {cpu:.1f} s ({1e6 * cpu / receipts:.0f} µs a receipt, both sides)")
        print(f"peak RSS: {rss / 1024:.1f} MiB (before reconciling: {rss_before / 1024:.1f} MiB)")
        if trace:
            print(f"peak traced memory: {peak / 2**20:.1f} MiB")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _in_sync(report: ReconcileReport) -> bool:
    others = ("missing_ours", "missing_theirs", "disputed", "mismatched", "equivocation")
    return all(getattr(report, name).count == 0 for name in (*others, "rejected"))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale.reconcile", description=__doc__)
    parser.add_argument("--receipts", type=int, default=1_000_000)
    parser.add_argument("--page", type=int, default=PAGE, help="receipts a page")
    parser.add_argument("--trace", action="store_true", help="also tracemalloc's peak")
    args = parser.parse_args()
    asyncio.run(run(args.receipts, args.page, args.trace))


if __name__ == "__main__":
    main()
