"""Netting: clear a group's balances with as few transfers as a simple rule allows.

`transfer_plan` takes each node's balance in micro-units (positive: it is owed, as
`ledger.settlement.balances` gives them) and returns transfers that bring every balance to
exactly zero. Debtors and creditors are each listed largest first, and the plan walks both
lists: each transfer pays the current creditor as much as the current debtor still owes or
the creditor is still owed, whichever is less, so every transfer clears at least one of the
two (the last clears both) and n nodes with a non-zero balance need at most n - 1
transfers. (Fewer can do when some subgroup's balances sum to zero on their own, but finding
the fewest is NP-hard; n - 1 is the usual promise.)

The plan is deterministic: ties are broken by node id, so it does not depend on the order
of the mapping, and every node computes the same plan from the same statements.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple


class Transfer(NamedTuple):
    payer: str
    payee: str
    amount: int  # micro-units, > 0


def transfer_plan(balances: Mapping[str, int]) -> list[Transfer]:
    """Transfers that clear all `balances` (at most n - 1 for n non-zero balances), in the
    order they were planned. ValueError if an amount is not an integer or they do not sum
    to zero."""
    for node, amount in balances.items():
        if type(amount) is not int:
            raise ValueError(f"balance of {node!r} is not an integer: {amount!r}")
    total = sum(balances.values())
    if total != 0:
        raise ValueError(f"balances do not sum to zero (off by {total})")
    # Largest amount first, ties by node id.
    creditors = sorted(((a, n) for n, a in balances.items() if a > 0), key=lambda x: (-x[0], x[1]))
    debtors = sorted(((-a, n) for n, a in balances.items() if a < 0), key=lambda x: (-x[0], x[1]))
    plan: list[Transfer] = []
    i = j = 0
    owed, owing = (creditors[0][0] if creditors else 0), (debtors[0][0] if debtors else 0)
    while i < len(debtors) and j < len(creditors):
        amount = min(owing, owed)
        plan.append(Transfer(debtors[i][1], creditors[j][1], amount))
        owing -= amount
        owed -= amount
        if owing == 0:
            i += 1
            owing = debtors[i][0] if i < len(debtors) else 0
        if owed == 0:
            j += 1
            owed = creditors[j][0] if j < len(creditors) else 0
    return plan
