"""The story `aihub network up` tells of its report: the nodes, who joined whom, the one
request and who served it, the receipt both sides keep, the balances, and what to try next.
Each line comes with its rich style (None: plain); the text is to be printed literally."""

from __future__ import annotations

from typing import Any

from node.demo.report import Report
from node.units import amount

Line = tuple[str, str | None]


def story(report: Report, root: str, aihub: str = "aihub") -> list[Line]:
    """`aihub`: how to type the command in the shell it prints for (a path where the
    script is not on the PATH), so that the commands it shows work as printed."""
    return [
        *_nodes(report),
        *_request(report),
        *_receipt(report),
        *_balances(report),
        *_try_it(report, root, aihub),
    ]


def _nodes(report: Report) -> list[Line]:
    lines: list[Line] = [("", None), ("Nodes", "bold")]
    for node in report.nodes:
        lines.append(
            (
                f"  {node.name:<6} {node.url:<24} {node.state:<20} pid {node.pid:<7} "
                f"{node.node_id}",
                None,
            )
        )
    lines += [("", None), ("Peers (joiner → issuer, by invite)", "bold")]
    lines += [(f"  {join.joiner} → {join.issuer}: {join.state}", None) for join in report.joins]
    return lines


def _request(report: Report) -> list[Line]:
    request = report.request
    lines: list[Line] = [
        ("", None),
        (f"One request at {request.asked} for {request.model}", "bold"),
        (f"  answer      {request.status}: {request.content!r}", None),
        (f"  request id  {request.request_id}", None),
        (
            f"  served by   {request.owner} ({request.asked} lists {request.model} as owned by "
            f"{request.owner}; its usage record says deployment {request.deployment})",
            None,
        ),
        (
            f"  cost        {amount(request.cost_micros)} charged to {request.asked}'s admin key",
            None,
        ),
    ]
    for who, usage in (
        (report.provider, request.provider_usage),
        (report.consumer, request.consumer_usage),
    ):
        if usage:
            lines.append((_usage_line(who, request.model, usage), None))
    return lines


def _usage_line(who: str, model: str, usage: dict[str, Any]) -> str:
    return (
        f"  usage at {who:<6} {usage['requests']} request(s) of {model}, "
        f"{usage['tokens_in']} tokens in, {usage['tokens_out']} out, "
        f"{amount(usage['cost_micros'])}  (aihub usage --by model)"
    )


def _receipt(report: Report) -> list[Line]:
    names = report.names
    receipt, mirror = report.receipt_provider, report.receipt_consumer
    same = receipt == mirror
    return [
        ("", None),
        ("The receipt (aihub ledger export --format json)", "bold"),
        (
            f"  {names.get(receipt['provider'], receipt['provider'])} → "
            f"{names.get(receipt['consumer'], receipt['consumer'])}  seq {receipt['seq']}  "
            f"amount {receipt['amount']} micro-units ({amount(receipt['amount'])})  "
            f"tokens {receipt['tokens_in']} in / {receipt['tokens_out']} out",
            None,
        ),
        (
            f"  signed by the provider (sig), countersigned by the consumer (csig); "
            f"{'identical on both sides' if same else 'THE TWO SIDES DIFFER'}",
            None,
        ),
    ]


def _balances(report: Report) -> list[Line]:
    lines: list[Line] = [
        ("", None),
        ("Balances since the last settlement (aihub ledger balance --json)", "bold"),
    ]
    for holder, row in (
        (report.provider, report.balance_provider),
        (report.consumer, report.balance_consumer),
    ):
        net = row["net"]
        lines.append(
            (
                f"  at {holder:<6} with {row['name']:<6} we used {amount(row['we_used'])}, they "
                f"used {amount(row['they_used'])}, net {_signed(net)} "
                f"({'they owe us' if net > 0 else 'we owe them' if net < 0 else 'even'})",
                None,
            )
        )
    return lines


def _try_it(report: Report, root: str, aihub: str) -> list[Line]:
    request = report.request
    consumer = next(n for n in report.nodes if n.name == request.asked)
    body = f'{{"model": "{request.model}", "messages": [{{"role": "user", "content": "hi"}}]}}'
    return [
        ("", None),
        ("Try it yourself", "bold"),
        (f"  export AIHUB_KEY=$(cat {request.key_file})", None),
        (
            f'  curl {consumer.url}/v1/chat/completions -H "Authorization: Bearer $AIHUB_KEY" '
            f"-H 'Content-Type: application/json' -d '{body}'",
            None,
        ),
        (f"  {aihub} ledger balance --data-dir {consumer.data_dir}", None),
        (f"  {aihub} network down --data-dir {root}", None),
    ]


def _signed(micros: int) -> str:
    return ("+" if micros > 0 else "-" if micros < 0 else "") + amount(abs(micros))
