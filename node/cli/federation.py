"""`aihub invite`, `aihub join` and `aihub peers`: making and managing peers from the shell.

Like the key commands, these work on the node's data folder directly (access to it is the
admin's credential) and tell a running node through the epoch files. The peer transport
(httpx, and `node.peers.peering` with aiohttp behind it) is imported by the commands that talk
to another node, when they run: `aihub peers list` or `aihub invite create --help` read only
the data folder (tests/test_cli_startup.py holds them to that).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click
import msgspec
from rich.table import Table

from federation.descriptors import NodeDescriptor, make_descriptor, verify_descriptor
from federation.identity import NodeIdentity
from federation.invites import Invite, create_invite, make_join_request, parse_invite
from federation.printable import printable
from federation.sealing import seal_for
from ledger.records import RecordError
from node.cli.folder import cli_actor, currency_of, require_config
from node.cli.options import (
    DURATION_HELP,
    MONEY_HELP,
    comma_list,
    duration_option,
    money_option,
    with_data_dir,
)
from node.cli.output import console, echo_json, fail, short_id, shown, warn
from node.config import IDENTITY_FILE, Config, store_target
from node.gateway.auth import touch_epoch
from node.gateway.policy import PERIODS, Limits, model_allowed, period_start
from node.peers import audit
from node.peers.address import advertised_urls, reachability_warning
from node.storage import opened
from node.storage.records import InviteRow, PeerRecord
from node.units import amount

if TYPE_CHECKING:
    from node.storage.base import Store

T = TypeVar("T")

models_option = click.option(
    "--models",
    default="",
    help="Comma-separated, case-sensitive globs of this node's models the peer may use "
    "(e.g. llama3*,gpt-4o) [default: all it shares]",
)
cap_option = click.option(
    "--cap",
    callback=money_option,
    help=f"What the peer may spend here per --period: {MONEY_HELP} [default: no cap]",
)
period_option = click.option(
    "--period",
    type=click.Choice(PERIODS),
    default="monthly",
    show_default=True,
    help="The period the --cap is for: daily, weekly (from Monday) and monthly (from the 1st) "
    "begin at 00:00 UTC; total never resets",
)


async def _with_store(directory: Path, work: Callable[[Store], Awaitable[T]]) -> T:
    async with opened(**store_target(directory)._asdict()) as store:
        return await work(store)


def _identity_of(directory: Path) -> NodeIdentity:
    return NodeIdentity.load(directory / IDENTITY_FILE)


def _tell_node(directory: Path) -> None:
    """A running node reloads its keys and peers on its next request / within a second."""
    from node.peers.peering import PEERS_EPOCH_FILE

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
@click.option(
    "--expires",
    default="24h",
    show_default=True,
    callback=duration_option,
    help=f"How long the token can be used: {DURATION_HELP}",
)
@click.option(
    "--uses",
    type=click.IntRange(1, 1000),
    default=1,
    show_default=True,
    help="How many nodes may join with the token (1 to 1000)",
)
@with_data_dir
def invite_create(
    directory: Path, models: str, cap: int | None, period: str, expires: int, uses: int
) -> None:
    """Print an invite token (`aihub1.…`) for another node's `aihub join`.

    The token carries the address this node is served on now (`[federation] public_urls`
    if set); a warning says when another server could not reach it, or when a --models
    pattern matches none of this node's models."""
    config = require_config(directory)
    patterns = comma_list(models)
    urls = advertised_urls(config, directory)
    for problem in _invite_problems(config, urls, patterns):
        warn(problem)
    token, record = create_invite(
        _identity_of(directory), urls, patterns, cap, period, uses, expires
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

    async def keep(store: Store) -> None:
        await store.peers.insert_invite(row)
        await audit.record(
            store,
            cli_actor(),
            "invite.create",
            record.token_id,
            models=",".join(patterns) or "*",
            cap_micros=cap,
            uses=uses,
            exp=record.exp,
        )

    asyncio.run(_with_store(directory, keep))
    console.print(token, highlight=False, soft_wrap=True, markup=False)


def _shared(config: Config) -> list[str]:
    """The model names this node can share with a peer (adverts carry chat and embeddings)."""
    return [d.name for d in config.models if d.kind in ("chat", "embeddings")]


def _invite_problems(config: Config, urls: list[str], patterns: list[str]) -> list[str]:
    """What would make the invite useless as given: an address others cannot reach, a
    pattern that matches no model, no model to share at all."""
    problems = []
    unreachable = reachability_warning(urls)
    if unreachable is not None:
        problems.append(unreachable)
    shared = _shared(config)
    if not shared:
        problems.append(
            "this node has no chat or embeddings model to share ([[models]] in config.toml)"
        )
    for pattern in patterns:
        if shared and not any(model_allowed([pattern], name) for name in shared):
            problems.append(
                f"--models pattern {pattern!r} matches none of this node's models "
                f"({', '.join(shared)}); patterns are case-sensitive globs such as llama3*"
            )
    return problems


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
        hint = "" if "expired" in str(exc) else _WHOLE_TOKEN
        fail(f"invalid invite: {exc}{hint}")
    urls = advertised_urls(config, directory)
    descriptor = make_descriptor(identity, config.node.name, urls)
    body = msgspec.json.encode(make_join_request(invite, identity, descriptor))
    outcome = asyncio.run(_send_join(identity, invite, body))
    if isinstance(outcome, str):
        fail(outcome)

    async def keep(store: Store) -> None:
        await store.peers.save_peer(outcome)
        await audit.record(store, cli_actor(), "peer.join", outcome.node_id, name=outcome.name)

    asyncio.run(_with_store(directory, keep))
    _tell_node(directory)
    local = [d.name for d in config.models]
    console.print(_joined_message(outcome, local), highlight=False, markup=False)


def _joined_message(peer: PeerRecord, local: list[str]) -> str:
    """What a join got: the models the peer shares with us, or plainly that there are none;
    a bare name this node serves itself stays local (the peer's is MODEL@peer)."""
    models = advertised_models(peer)
    joined = f"Joined {printable(peer.name)} ({short_id(peer.node_id)})"
    if not models:
        return (
            f"{joined}, but it shares no models with this node: its invite allows none of "
            "the models it serves. Ask its admin for an invite with --models that match them."
        )
    at = "@" + printable(peer.name)
    names = ", ".join(printable(m) + (at if m in local else "") for m in models)
    return f"{joined}. Its models available through this node: {names} (each also as MODEL{at})."


_WHOLE_TOKEN = (
    "; copy the whole token, exactly as `aihub invite create` printed it (one line, from "
    "aihub1. to its end)"
)


async def _send_join(identity: NodeIdentity, invite: Invite, body: bytes) -> PeerRecord | str:
    """Send the join request to each of the invite's URLs until one answers: the peer it
    makes us, or what went wrong."""
    import httpx

    from node.peers.peering import joined_peer, refusal, signed_request

    problem = "no URL in the invite"
    async with httpx.AsyncClient() as client:
        for url in invite.urls:
            try:
                response = await signed_request(
                    client, identity, "POST", url + "/federation/join", None, body
                )
            except httpx.HTTPError as exc:
                problem = (
                    f"could not reach the inviting node at {url} ({type(exc).__name__}): is it "
                    "running, and can this machine reach that address? (Its admin sets the "
                    "address invites carry with [federation] public_urls.)"
                )
                continue
            if response.status_code == 404:
                # Whatever answers there is not the node that made the invite (any more).
                return (
                    f"the node at {url} does not know this invite (404): an invite carries "
                    "the address its node was served on when it was made; ask for a new one "
                    "if that node now runs elsewhere"
                )
            if response.status_code != 200:
                return f"{url} refused the join ({response.status_code}): {refusal(response)}"
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
    # When its health was last checked (unix seconds), and that check in words.
    checked_at: int | None = None
    health: str = "-"


@peers_group.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include peers revoked here")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the same as --format json)")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="A table, or one JSON array with full node ids",
)
@click.option("--wide", is_flag=True, help="Full node ids in the table (wider than 80 columns)")
@with_data_dir
def peers_list(directory: Path, show_all: bool, as_json: bool, fmt: str, wide: bool) -> None:
    """Each peer: status, health and latency, the models it lets us use, what it spent here."""
    currency = currency_of(directory)
    now = int(time.time())
    rows = asyncio.run(_with_store(directory, lambda s: _peer_views(s, show_all, currency, now)))
    if as_json or fmt == "json":
        echo_json(rows)
        return
    table = Table(title="Peers")
    # The short id, status and health stay on one line; names, models and amounts fold.
    table.add_column("name", overflow="fold")
    table.add_column("node id", no_wrap=not wide, overflow="fold")
    table.add_column("status", no_wrap=True)
    table.add_column("health", no_wrap=True)
    table.add_column("models", overflow="fold")  # what it lets us use
    table.add_column("spent here", overflow="fold")
    for row in rows:
        table.add_row(
            shown(row.name),
            row.node_id if wide else short_id(row.node_id),
            STATUS_WORDS.get(row.status, row.status),
            row.health,
            shown(", ".join(row.models) or "-"),
            row.spent,
        )
    console.print(table)


# A status as the table says it (JSON keeps the stored word).
STATUS_WORDS = {"revoked_by_peer": "revoked us", "requested": "asked to join"}


def health_words(healthy: bool | None, latency: int | None, checked: int | None, now: int) -> str:
    """A peer's health as a person reads it: up or down, and as of when."""
    if healthy is None or checked is None:
        return "not checked yet"
    ago = _ago(now - checked)
    if healthy:
        return f"up, {latency} ms ({ago})" if latency is not None else f"up ({ago})"
    return f"down ({ago})"


def _ago(seconds: int) -> str:
    if seconds < 60:
        return f"{max(seconds, 0)}s ago"
    if seconds < 3600:
        return f"{seconds // 60}m ago"
    if seconds < 86400:
        return f"{seconds // 3600}h ago"
    return f"{seconds // 86400}d ago"


def advertised_models(record: PeerRecord) -> list[str]:
    """The model ids of the peer's advert we hold (what it lets us use)."""
    if not record.advert:
        return []
    try:
        advert = msgspec.json.decode(record.advert)
        return [str(model["id"]) for model in advert.get("models", [])]
    except (msgspec.DecodeError, TypeError, KeyError, AttributeError):
        return []


async def _peer_views(store: Store, show_all: bool, currency: str, now: int) -> list[PeerView]:
    health = await store.peers.peer_health()
    views = []
    for record in await store.peers.peers(include_revoked=show_all):
        healthy, latency, checked = health.get(record.node_id, (None, None, None))
        cut = record.status != "active"
        # A peer that lets us use none of its models (it only uses ours) is never checked.
        words = "uses ours only" if record.key_from_them is None else None
        views.append(
            PeerView(
                record.name,
                record.node_id,
                record.status,
                None if cut else healthy,
                None if cut else latency,
                advertised_models(record),
                await _spent_here(store, record, currency),
                checked,
                "-" if cut else words or health_words(healthy, latency, checked, now),
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
    """Cut PEER (name or node id) off: its key and pinned identity stop working here, and
    it is told (a signed notice), so that it stops offering this node's models at once."""
    import httpx

    from node.gateway.propagation import confirm
    from node.peers import revocation

    identity = _identity_of(directory)
    unconfirmed: list[str] = []

    async def work(store: Store) -> tuple[PeerRecord | None, str | None]:
        record = await revocation.revoke(store, peer, cli_actor())
        if record is None:
            return None, None
        _tell_node(directory)
        # Its key refused by every process of this node before it is told.
        unconfirmed.extend(await confirm(store, directory))
        async with httpx.AsyncClient() as client:
            return record, await revocation.tell_revoked(client, identity, record)

    record, problem = asyncio.run(_with_store(directory, work))
    if record is None:
        fail(f"no active peer {peer!r}")
    for line in unconfirmed:
        warn(line)
    name = printable(record.name)
    if problem is None:
        console.print(f"Revoked {name}; it was told.", highlight=False, markup=False)
    else:
        console.print(
            f"Revoked {name}; {problem}, so it learns at its next health check.",
            highlight=False,
            markup=False,
        )


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
        _with_store(
            directory,
            lambda store: _ask(
                store, identity, config, advertised_urls(config, directory), url, pinned
            ),
        )
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
    store: Store,
    identity: NodeIdentity,
    config: Config,
    urls: list[str],
    url: str,
    pinned: str,
) -> tuple[str, str]:
    """Identify the node at `url` (by its signed descriptor, pinned if given) and ask it to
    make us a peer: (pending | joined | what went wrong, its name)."""
    import httpx

    from node.peers.peering import ask_to_join

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
        ours = make_descriptor(identity, config.node.name, urls)
        outcome = await ask_to_join(
            store, identity, client, record, ours, listed=config.federation.listed
        )
        await audit.record(store, cli_actor(), "peer.request", issuer.node_id, name=issuer.name)
        return outcome, issuer.name


@peers_group.command("pending")
@click.option(
    "--json", "as_json", is_flag=True, help="Print JSON: [descriptor, received unix seconds] pairs"
)
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
    urls = advertised_urls(config, directory)
    unconfirmed: list[str] = []

    async def approve(store: Store) -> str | None:
        from node.gateway.propagation import confirm

        name = await _approve(store, identity, config, urls, node, limits)
        if name is not None:
            _tell_node(directory)
            # The key it was issued works on every host of this node when it first asks.
            unconfirmed.extend(await confirm(store, directory))
        return name

    name = asyncio.run(_with_store(directory, approve))
    if name is None:
        fail(f"no pending join request from {node!r} (see `aihub peers pending`)")
    for line in unconfirmed:
        warn(line)
    console.print(
        f"Approved {printable(name)}: it becomes a peer when its node next asks (a running "
        "node asks at each health check: every 30 s by default).",
        markup=False,
        highlight=False,
    )


async def _approve(
    store: Store,
    identity: NodeIdentity,
    config: Config,
    urls: list[str],
    node: str,
    limits: Limits,
) -> str | None:
    """Admit the pending joiner named or numbered `node` and keep its answer for when it next
    asks; its name, or None if no such request is pending."""
    from node.peers.peering import admit_peer

    for descriptor, _ in await _pending(store):
        if node in (descriptor.node_id, descriptor.name):
            key = await admit_peer(store, identity, descriptor, limits, None)
            assert key is not None  # no invite to be used up
            answer = _approval(identity, config, urls, descriptor, key)
            await store.peers.save_join_answer(descriptor.node_id, answer, int(time.time()))
            await audit.record(
                store,
                cli_actor(),
                "peer.approve",
                descriptor.node_id,
                name=descriptor.name,
                models=",".join(limits.models or ()) or "*",
                cap_micros=limits.budget_micros,
            )
            return descriptor.name
    return None


def _approval(
    identity: NodeIdentity, config: Config, urls: list[str], joiner: NodeDescriptor, key: str
) -> str:
    """The answer the joiner gets when it next asks: as for an invited join, our descriptor
    and its key sealed to it (so the answer is safe at rest here). No advert: only the running
    node knows its advert seq; the joiner fetches the advert as soon as it has joined."""
    from node.peers.peering import JoinResponse

    answer = JoinResponse(
        v=1,
        descriptor=msgspec.to_builtins(make_descriptor(identity, config.node.name, urls)),
        sealed_key=seal_for(joiner.node_id, key.encode()),
    )
    return msgspec.json.encode(answer).decode()
