"""`aihub invite`, `aihub join` and `aihub peers`: making and managing peers from the shell.

Like the key commands, these work on the node's data folder directly (access to it is the
admin's credential) and tell a running node through the epoch files.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import click
import httpx
import msgspec
from rich.table import Table

from federation.descriptors import NodeDescriptor, make_descriptor, verify_descriptor
from federation.identity import NodeIdentity
from federation.invites import Invite, create_invite, make_join_request, parse_invite
from federation.printable import printable
from federation.sealing import seal_for
from ledger.records import RecordError
from node.cli.folder import currency_of, require_config
from node.cli.options import comma_list, duration_option, money_option, with_data_dir
from node.cli.output import console, echo_json, fail, shown
from node.config import IDENTITY_FILE, Config, store_target
from node.gateway.auth import touch_epoch
from node.gateway.policy import PERIODS, Limits, period_start
from node.peers.peering import (
    PEERS_EPOCH_FILE,
    JoinResponse,
    admit_peer,
    ask_to_join,
    joined_peer,
    signed_request,
)
from node.storage import opened
from node.storage.base import Store
from node.storage.records import InviteRow, PeerRecord
from node.units import amount

T = TypeVar("T")

models_option = click.option(
    "--models", default="", help="Comma-separated globs the peer may use [all]"
)
cap_option = click.option(
    "--cap", callback=money_option, help="Spend cap in currency units, e.g. 10"
)
period_option = click.option(
    "--period", type=click.Choice(PERIODS), default="monthly", show_default=True
)


async def _with_store(directory: Path, work: Callable[[Store], Awaitable[T]]) -> T:
    async with opened(**store_target(directory)._asdict()) as store:
        return await work(store)


def _identity_of(directory: Path) -> NodeIdentity:
    return NodeIdentity.load(directory / IDENTITY_FILE)


def _tell_node(directory: Path) -> None:
    """A running node reloads its keys and peers on its next request / within a second."""
    touch_epoch(directory)
    touch_epoch(directory, PEERS_EPOCH_FILE)


# --- invite and join --------------------------------------------------------------------------


@click.group("invite")
def invite_group() -> None:
    """Invite another node to use this node's models."""


@invite_group.command("create")
@models_option
@cap_option
@period_option
@click.option("--expires", default="24h", show_default=True, callback=duration_option)
@click.option("--uses", type=click.IntRange(1, 1000), default=1, show_default=True)
@with_data_dir
def invite_create(
    directory: Path, models: str, cap: int | None, period: str, expires: int, uses: int
) -> None:
    """Print an invite token (`aihub1.…`) for another node's `aihub join`."""
    config = require_config(directory)
    token, record = create_invite(
        _identity_of(directory),
        config.public_urls(),
        comma_list(models),
        cap,
        period,
        uses,
        expires,
    )
    row = InviteRow(
        token_id=record.token_id,
        public_key=record.invite_public_key,
        exp=record.exp,
        uses_left=record.uses,
        models=record.models,
        cap_micros=record.cap_micros,
        cap_period=record.cap_period,
        created_at=int(time.time()),
    )
    asyncio.run(_with_store(directory, lambda store: store.peers.insert_invite(row)))
    console.print(token, highlight=False, soft_wrap=True, markup=False)


@click.command("join")
@click.argument("token")
@with_data_dir
def join(directory: Path, token: str) -> None:
    """Join the node that issued TOKEN: become its peer and use its shared models."""
    config = require_config(directory)
    identity = _identity_of(directory)
    try:
        invite = parse_invite(token.strip())
    except RecordError as exc:
        fail(f"invalid invite: {exc}")
    descriptor = make_descriptor(identity, config.node.name, config.public_urls())
    body = msgspec.json.encode(make_join_request(invite, identity, descriptor))
    outcome = asyncio.run(_send_join(identity, invite, body))
    if isinstance(outcome, str):
        fail(outcome)
    asyncio.run(_with_store(directory, lambda store: store.peers.save_peer(outcome)))
    _tell_node(directory)
    console.print(
        f"Joined {printable(outcome.name)} ({outcome.node_id}); its shared models are now "
        "available through this node.",
        highlight=False,
        markup=False,
    )


async def _send_join(identity: NodeIdentity, invite: Invite, body: bytes) -> PeerRecord | str:
    """Send the join request to each of the invite's URLs until one answers: the peer it
    makes us, or what went wrong."""
    problem = "no URL in the invite"
    async with httpx.AsyncClient() as client:
        for url in invite.urls:
            try:
                response = await signed_request(
                    client, identity, "POST", url + "/federation/join", None, body
                )
            except httpx.HTTPError as exc:
                problem = f"{url}: {type(exc).__name__}"
                continue
            if response.status_code != 200:
                return f"{url} refused the join ({response.status_code}): " + (response.text[:300])
            try:
                return joined_peer(identity, response.content, invite.issuer)
            except RecordError as exc:
                return str(exc)
    return problem


# --- peers ------------------------------------------------------------------------------------


@click.group("peers")
def peers_group() -> None:
    """This node's peers: list, revoke, and join requests without an invite."""


class PeerView(msgspec.Struct):
    name: str
    node_id: str
    status: str
    healthy: bool | None
    latency_ms: int | None
    models: list[str]
    spent: str


@peers_group.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include revoked peers")
@click.option("--json", "as_json", is_flag=True, help="Print JSON")
@with_data_dir
def peers_list(directory: Path, show_all: bool, as_json: bool) -> None:
    """Each peer: status, health and latency, its models, what it spent here."""
    currency = currency_of(directory)
    rows = asyncio.run(_with_store(directory, lambda s: _peer_views(s, show_all, currency)))
    if as_json:
        echo_json(rows)
        return
    table = Table(title="Peers")
    for column in ("name", "node id", "status", "health", "their models", "spent here"):
        table.add_column(column, overflow="fold")
    for row in rows:
        health = "-"
        if row.healthy is not None:
            health = f"up, {row.latency_ms} ms" if row.healthy else "down"
        table.add_row(
            shown(row.name),
            row.node_id,
            row.status,
            health,
            shown(", ".join(row.models) or "-"),
            row.spent,
        )
    console.print(table)


async def _peer_views(store: Store, show_all: bool, currency: str) -> list[PeerView]:
    health = await store.peers.peer_health()
    views = []
    for record in await store.peers.peers(include_revoked=show_all):
        models: list[str] = []
        if record.advert:
            advert = msgspec.json.decode(record.advert)
            models = [model["id"] for model in advert.get("models", [])]
        healthy, latency, _ = health.get(record.node_id, (None, None, 0))
        views.append(
            PeerView(
                record.name,
                record.node_id,
                record.status,
                healthy,
                latency,
                models,
                await _spent_here(store, record, currency),
            )
        )
    return views


async def _spent_here(store: Store, record: PeerRecord, currency: str) -> str:
    """What the peer has spent here this period, under the key we issued it."""
    if not record.key_for_them:
        return "-"
    key = await store.keys.key(record.key_for_them)
    if key is None:
        return "-"
    start = period_start(key.limits.budget_period, time.time())
    found = await store.spend.spend([(f"key:{key.id}", start)])
    used = amount(found[0].spent if found else 0, currency)
    cap = key.limits.budget_micros
    if cap is None:
        return used
    return f"{used} of {amount(cap, currency)} {key.limits.budget_period}"


@peers_group.command("revoke")
@click.argument("peer")
@with_data_dir
def peers_revoke(directory: Path, peer: str) -> None:
    """Cut PEER (name or node id) off: its key and pinned identity stop working."""
    name = asyncio.run(_with_store(directory, lambda store: _revoke(store, peer)))
    if name is None:
        fail(f"no active peer {peer!r}")
    _tell_node(directory)
    console.print(f"Revoked {printable(name)}.", highlight=False, markup=False)


async def _revoke(store: Store, peer: str) -> str | None:
    """Revoke the active peer named or numbered `peer`; its name, or None if there is none."""
    for record in await store.peers.peers():
        if peer in (record.name, record.node_id):
            await store.peers.revoke_peer(record.node_id, int(time.time()))
            return record.name
    return None


# --- join requests without an invite ---------------------------------------------------------


@peers_group.command("request")
@click.argument("seed")
@with_data_dir
def peers_request(directory: Path, seed: str) -> None:
    """Ask the node at SEED (a URL, or `ed25519:…@URL` to pin its id) to make us a peer,
    without an invite. Its admin approves with `aihub peers approve`; this node keeps
    asking until then (or run this again)."""
    config = require_config(directory)
    identity = _identity_of(directory)
    pinned, _, url = seed.rpartition("@")
    url = url.rstrip("/")
    outcome, name = asyncio.run(
        _with_store(directory, lambda store: _ask(store, identity, config, url, pinned))
    )
    if outcome == "pending":
        console.print(
            f"Asked {printable(name)} to make us a peer; waiting for its admin.", markup=False
        )
    elif outcome == "joined":
        _tell_node(directory)
        console.print(f"Joined {printable(name)}.", markup=False)
    else:
        fail(outcome)
    _tell_node(directory)


async def _ask(
    store: Store, identity: NodeIdentity, config: Config, url: str, pinned: str
) -> tuple[str, str]:
    """Identify the node at `url` (by its signed descriptor, pinned if given) and ask it to
    make us a peer: (pending | joined | what went wrong, its name)."""
    async with httpx.AsyncClient() as client:
        try:
            response = await client.get(url + "/federation/node", timeout=10)
            issuer = verify_descriptor(response.content, pinned=pinned or None)
        except (httpx.HTTPError, RecordError) as exc:
            return f"could not identify the node at {url}: {exc}", ""
        if issuer.node_id == identity.node_id:
            return "that is this node", ""
        record = PeerRecord(
            node_id=issuer.node_id,
            name=issuer.name,
            descriptor=msgspec.json.encode(issuer).decode(),
            status="requested",
            created_at=int(time.time()),
        )
        return await ask_to_join(store, identity, client, record, config), issuer.name


@peers_group.command("pending")
@click.option("--json", "as_json", is_flag=True, help="Print JSON")
@with_data_dir
def peers_pending(directory: Path, as_json: bool) -> None:
    """Join requests from nodes without an invite, waiting for approval."""
    pending = asyncio.run(_with_store(directory, _pending))
    if as_json:
        echo_json(pending)
        return
    table = Table(title="Join requests")
    for column in ("name", "node id", "urls", "received"):
        table.add_column(column, overflow="fold")
    for descriptor, received in pending:
        table.add_row(
            shown(descriptor.name),
            descriptor.node_id,
            shown(", ".join(descriptor.urls)),
            time.strftime("%Y-%m-%d %H:%M", time.gmtime(received)),
        )
    console.print(table)


async def _pending(store: Store) -> list[tuple[NodeDescriptor, int]]:
    pending = []
    for _, descriptor, received in await store.peers.join_requests():
        pending.append((msgspec.json.decode(descriptor, type=NodeDescriptor), received))
    return pending


@peers_group.command("approve")
@click.argument("node")
@models_option
@cap_option
@period_option
@with_data_dir
def peers_approve(directory: Path, node: str, models: str, cap: int | None, period: str) -> None:
    """Make NODE (node id or name of a pending request) a peer, with a cross-node key
    limited to these models and this cap: the same as if it had joined by invite."""
    config = require_config(directory)
    identity = _identity_of(directory)
    limits = msgspec.convert(
        {"models": comma_list(models) or None, "budget_micros": cap, "budget_period": period},
        Limits,
    )
    name = asyncio.run(
        _with_store(directory, lambda store: _approve(store, identity, config, node, limits))
    )
    if name is None:
        fail(f"no pending join request from {node!r} (see `aihub peers pending`)")
    _tell_node(directory)
    console.print(
        f"Approved {printable(name)}: it becomes a peer when it next asks (within seconds if "
        "its node is running).",
        markup=False,
        highlight=False,
    )


async def _approve(
    store: Store, identity: NodeIdentity, config: Config, node: str, limits: Limits
) -> str | None:
    """Admit the pending joiner named or numbered `node` and keep its answer for when it next
    asks; its name, or None if no such request is pending."""
    for descriptor, _ in await _pending(store):
        if node in (descriptor.node_id, descriptor.name):
            key = await admit_peer(store, identity, descriptor, limits, None)
            assert key is not None  # no invite to be used up
            answer = _approval(identity, config, descriptor, key)
            await store.peers.save_join_answer(descriptor.node_id, answer, int(time.time()))
            return descriptor.name
    return None


def _approval(identity: NodeIdentity, config: Config, joiner: NodeDescriptor, key: str) -> str:
    """The answer the joiner gets when it next asks: as for an invited join, our descriptor
    and its key sealed to it (so the answer is safe at rest here). No advert: only the running
    node knows its advert seq; the joiner fetches the advert as soon as it has joined."""
    answer = JoinResponse(
        v=1,
        descriptor=msgspec.to_builtins(
            make_descriptor(identity, config.node.name, config.public_urls())
        ),
        sealed_key=seal_for(joiner.node_id, key.encode()),
    )
    return msgspec.json.encode(answer).decode()
