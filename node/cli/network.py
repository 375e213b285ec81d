"""`aihub network up` and `aihub network down`: a three-node network on this machine, and the
story of one request across it (the logic is in `node.demo.network`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import msgspec
from rich.markup import escape

from node.demo.network import (
    DEFAULT_BASE_PORT,
    DEFAULT_DIR,
    Network,
    NetworkError,
    Report,
    in_process,
)
from node.units import amount


def register(main: click.Group, console: Any) -> None:
    """Add `aihub network` to the CLI."""

    def say(line: str) -> None:
        console.print(escape(line), highlight=False, soft_wrap=True)

    def quiet(_line: str) -> None:
        pass

    dir_option = click.option(
        "--dir",
        "root",
        default=DEFAULT_DIR,
        show_default=True,
        type=click.Path(file_okay=False),
        help="The network's folder: one data folder per node",
    )

    @main.group()
    def network() -> None:
        """A three-node network on this machine (alice, bob, carol), for trying federation."""

    @network.command("up")
    @dir_option
    @click.option(
        "--base-port",
        type=click.IntRange(1, 65533),
        default=DEFAULT_BASE_PORT,
        show_default=True,
        help="alice's port; bob and carol take the next two (an existing network keeps its own)",
    )
    @click.option("--json", "as_json", is_flag=True, help="Print the report as JSON")
    def up(root: str, base_port: int, as_json: bool) -> None:
        """Start alice, bob and carol on loopback (or reuse them), have bob and carol join alice
        and alice join carol by invite, ask carol for a model only alice serves, and show who
        served it, the receipt both keep and the balances on each side."""
        try:
            net = Network(Path(root), base_port, in_process(main), quiet if as_json else say)
            report = net.up()
        except NetworkError as exc:
            raise click.ClickException(str(exc)) from exc
        if as_json:
            click.echo(msgspec.json.encode(report).decode())
        else:
            _print_report(console, report, root)

    @network.command("down")
    @dir_option
    def down(root: str) -> None:
        """Stop the network's nodes (SIGTERM, then SIGKILL after 10 s); keep their data."""
        try:
            net = Network(Path(root), DEFAULT_BASE_PORT, in_process(main), say)
            stopped = net.down()
        except NetworkError as exc:
            raise click.ClickException(str(exc)) from exc
        for entry in stopped:
            pid = f" (pid {entry.pid})" if entry.pid else ""
            say(f"{entry.name}: {entry.state}{pid}")
        say(f"The data is kept in {net.root}; `aihub network up --dir {root}` starts it again.")


def _print_report(console: Any, report: Report, root: str) -> None:
    def line(text: str = "", style: str | None = None) -> None:
        console.print(escape(text), style=style, highlight=False, soft_wrap=True)

    names = report.names
    line()
    line("Nodes", "bold")
    for node in report.nodes:
        line(f"  {node.name:<6} {node.url:<24} {node.state:<20} pid {node.pid:<7} {node.node_id}")
    line()
    line("Peers (joiner → issuer, by invite)", "bold")
    for join in report.joins:
        line(f"  {join.joiner} → {join.issuer}: {join.state}")
    request = report.request
    line()
    line(f"One request at {request.asked} for {request.model}", "bold")
    line(f"  answer      {request.status}: {request.content!r}")
    line(f"  request id  {request.request_id}")
    line(
        f"  served by   {request.owner} ({request.asked} lists {request.model} as owned by "
        f"{request.owner}; its usage record says deployment {request.deployment})"
    )
    line(f"  cost        {amount(request.cost_micros)} charged to {request.asked}'s admin key")
    for who, usage in (
        (report.provider, request.provider_usage),
        (report.consumer, request.consumer_usage),
    ):
        if usage:
            line(
                f"  usage at {who:<6} {usage['requests']} request(s) of {request.model}, "
                f"{usage['tokens_in']} tokens in, {usage['tokens_out']} out, "
                f"{amount(usage['cost_micros'])}  (aihub usage --by model)"
            )
    receipt, mirror = report.receipt_provider, report.receipt_consumer
    same = receipt == mirror
    line()
    line("The receipt (aihub ledger export --format json)", "bold")
    line(
        f"  {names.get(receipt['provider'], receipt['provider'])} → "
        f"{names.get(receipt['consumer'], receipt['consumer'])}  seq {receipt['seq']}  "
        f"amount {receipt['amount']} micro-units ({amount(receipt['amount'])})  "
        f"tokens {receipt['tokens_in']} in / {receipt['tokens_out']} out"
    )
    line(
        f"  signed by the provider (sig), countersigned by the consumer (csig); "
        f"{'identical on both sides' if same else 'THE TWO SIDES DIFFER'}"
    )
    line()
    line("Balances since the last settlement (aihub ledger balance --json)", "bold")
    for holder, row in (
        (report.provider, report.balance_provider),
        (report.consumer, report.balance_consumer),
    ):
        line(
            f"  at {holder:<6} with {row['name']:<6} we used {amount(row['we_used'])}, they used "
            f"{amount(row['they_used'])}, net {_signed(row['net'])} "
            f"({'they owe us' if row['net'] > 0 else 'we owe them' if row['net'] < 0 else 'even'})"
        )
    consumer = next(n for n in report.nodes if n.name == request.asked)
    line()
    line("Try it yourself", "bold")
    line(f"  export AIHUB_KEY=$(cat {request.key_file})")
    line(
        f'  curl {consumer.url}/v1/chat/completions -H "Authorization: Bearer $AIHUB_KEY" '
        f"-H 'Content-Type: application/json' "
        f'-d \'{{"model": "{request.model}", "messages": [{{"role": "user", "content": "hi"}}]}}\''
    )
    line(f"  aihub ledger balance --data-dir {consumer.data_dir}")
    line(f"  aihub network down --dir {root}")


def _signed(micros: int) -> str:
    return ("+" if micros > 0 else "-" if micros < 0 else "") + amount(abs(micros))
