"""`aihub peers discover`: nodes found over mDNS, through seeds and by peer exchange that are
not yet peers of this node.

Discovery only lists: every node shown proved its node id by a signed descriptor, but none of
them is trusted or can use anything here until it joins through an invite or an approved join
request.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
import msgspec
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from federation.descriptors import fingerprint
from federation.identity import NodeIdentity
from federation.printable import printable
from node.cli.folder import require_config
from node.cli.options import with_data_dir
from node.cli.output import console, echo_json, errors, shown, warn
from node.config import IDENTITY_FILE, Config, store_target
from node.storage import opened
from node.storage.records import PeerRecord

if TYPE_CHECKING:
    from federation.discovery import Discovered


class DiscoveredView(msgspec.Struct):
    node_id: str
    fingerprint: str
    name: str
    urls: list[str]
    via: str


async def _active_peers(directory: Path) -> list[PeerRecord]:
    async with opened(**store_target(directory)._asdict()) as store:
        return [peer for peer in await store.peers.peers() if peer.status == "active"]


async def discover_for_node(
    directory: Path,
    config: Config,
    identity: NodeIdentity,
    *,
    mdns: bool,
    wait: float,
    problems: list[str],
) -> list[Discovered]:
    """What `aihub peers discover` lists: every node found that is neither us nor a peer.
    The discovery stack (httpx, zeroconf) is imported here, when it is used: `aihub peers
    list` shares this module's group and has no use for it."""
    import httpx

    from federation.discovery import discover, exchange_descriptors

    peers = await _active_peers(directory)
    async with httpx.AsyncClient(timeout=wait, follow_redirects=False) as client:
        exchanged = await exchange_descriptors(
            client, identity, peers, request_timeout=wait, on_problem=problems.append
        )
        return await discover(
            client,
            seeds=config.federation.seeds,
            mdns=mdns,
            interface=config.federation.mdns_interface or None,
            timeout=wait,
            exchange=exchanged,
            self_id=identity.node_id,
            exclude={peer.node_id for peer in peers},
            on_problem=problems.append,
        )


@click.command("discover")
@click.option(
    "--timeout",
    "wait",
    type=click.FloatRange(0.1, 60),
    default=3.0,
    show_default=True,
    help="Seconds to listen for mDNS announcements, and to wait for each node",
)
@click.option(
    "--mdns/--no-mdns",
    default=None,
    help="Browse the local network over mDNS [default: federation.mdns in the config]",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON")
@with_data_dir
def peers_discover(directory: Path, wait: float, mdns: bool | None, as_json: bool) -> None:
    """List nodes found over mDNS, through the config's seeds and from peers (peer
    exchange) that are not yet peers. Listing grants nothing: a node becomes a peer only
    through an invite or an approved join request."""
    config = require_config(directory)
    try:
        identity = NodeIdentity.load(directory / IDENTITY_FILE)
    except (OSError, ValueError) as exc:
        errors.print(f"[bold red]error:[/] {escape(printable(str(exc)))}", highlight=False)
        sys.exit(1)
    use_mdns = config.federation.mdns if mdns is None else mdns
    problems: list[str] = []
    found = asyncio.run(
        discover_for_node(directory, config, identity, mdns=use_mdns, wait=wait, problems=problems)
    )
    for problem in problems:
        warn(problem)
    if as_json:
        echo_json(
            [
                DiscoveredView(d.node_id, fingerprint(d.node_id), d.name, list(d.urls), d.via)
                for d in found
            ]
        )
        return
    if not found:  # where it looked, without an empty table
        console.print(f"No new nodes found ({_sources(config, use_mdns)}).", highlight=False)
        return
    console.print(_table(found, _sources(config, use_mdns)))


def _sources(config: Config, use_mdns: bool) -> str:
    """Where the command looked, for the table's title."""
    return ", ".join(
        source
        for source, used in (
            ("mDNS", use_mdns),
            ("seeds", bool(config.federation.seeds)),
            ("peer exchange", True),
        )
        if used
    )


def _table(found: list[Discovered], sources: str) -> Table:
    table = Table(title=f"Discovered nodes, not yet peers (via {sources})")
    table.add_column("name", overflow="fold")
    table.add_column("node id", overflow="fold")
    table.add_column("urls", overflow="fold")
    table.add_column("via")
    for node in found:
        table.add_row(
            shown(node.name),
            shown(node.node_id),
            Text("\n".join(printable(url) for url in node.urls)),
            node.via,
        )
    return table
