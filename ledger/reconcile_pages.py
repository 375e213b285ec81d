"""Reconciling one chain page by page, in memory that does not grow with the chain.

Both copies of a chain (ours from the store, the peer's over the wire) arrive as pages in seq
order. `windows` merges the two page streams into *windows*: runs of seqs that both sides have
been read through, so that every copy of each seq in a window is in it, and `reconcile` of
one window gives the answer the whole chains would give for those seqs. At most about one page
of each side is held at a time, however long the chain.

A side "has been read through" seq s when a page of it reached s (or it ended): our own pages
come from the store in seq order; the peer's are checked, not trusted. A copy of the peer's
that arrives for a seq whose window is closed (its pages went backwards), or that is not of
the chain asked for, is `Rejected` in the next window and never compared: an honest node's
pages (`seq > after_seq`, in seq order, of the asked chain) never do that.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ledger.receipts import Receipt
from ledger.reconcile import Rejected

Chain = tuple[str, str]  # (provider, consumer)


@dataclass
class Window:
    """Every copy, on both sides, of the seqs in (after, through] of one chain."""

    after: int
    through: float  # math.inf for the last window
    ours: list[Receipt] = field(default_factory=list)
    theirs: list[Receipt] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


@dataclass
class _Side:
    pages: AsyncIterator[list[Receipt]]
    held: list[Receipt] = field(default_factory=list)
    read_through: float = 0  # every copy up to this seq has been read
    done: bool = False

    async def read(self) -> list[Receipt]:
        page = await anext(self.pages, None)
        if page is None:
            self.done, self.read_through = True, math.inf
            return []
        if page:
            self.read_through = max(self.read_through, max(r.seq for r in page))
        return page

    def take(self, through: float) -> list[Receipt]:
        """The held copies up to `through`, in seq order; the rest stay held."""
        self.held.sort(key=lambda r: r.seq)
        cut = next((i for i, r in enumerate(self.held) if r.seq > through), len(self.held))
        taken, self.held = self.held[:cut], self.held[cut:]
        return taken


def _chain_problem(r: Receipt, chain: Chain) -> str | None:
    if (r.provider, r.consumer) == chain:
        return None
    if {r.provider, r.consumer} == set(chain):
        return "receipt is of the other chain than the one asked for"
    return "receipt is not between the reconciled nodes"


async def windows(
    chain: Chain,
    ours: AsyncIterator[list[Receipt]],
    theirs: AsyncIterator[list[Receipt]],
) -> AsyncIterator[Window]:
    """The windows of one chain (see the module docstring), in seq order. `ours` and
    `theirs` yield pages of copies; each must end. The side read next is the one read
    through the lower seq, so neither runs more than a page ahead of the other."""
    mine, peer = _Side(ours), _Side(theirs)
    closed = 0.0  # every seq up to here is in a window already yielded
    rejected: list[Rejected] = []
    while not (mine.done and peer.done):
        behind = not mine.done and mine.read_through <= peer.read_through
        side = mine if peer.done or behind else peer
        for r in await side.read():
            problem = _chain_problem(r, chain) if side is peer else None
            if problem is None and r.seq <= closed:
                problem = "receipt came after its seq was compared (pages out of seq order)"
            if problem is not None:
                rejected.append(Rejected(r, problem))
            else:
                side.held.append(r)
        through = min(mine.read_through, peer.read_through)
        if through > closed:
            window = Window(int(closed), through, mine.take(through), peer.take(through), rejected)
            closed, rejected = max(closed, through), []
            yield window
