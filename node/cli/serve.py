"""`aihub serve`: start the node under uvicorn (or granian), after recovering what a node that
stopped mid-request left behind, announced over mDNS if the config says so."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.config
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import msgspec
from rich.markup import escape

from node import __version__
from node.cli.folder import require_config, require_identity, require_secrets
from node.cli.folder_lock import FolderInUse, serving
from node.cli.options import with_data_dir
from node.cli.output import console, fail
from node.config import IDENTITY_FILE, Config, ConfigError, ServerSection, store_target
from node.observe.logs import LEVELS, Level, log_config
from node.peers.address import recorded

if TYPE_CHECKING:
    import uvicorn

# Where the workers keep their counters (node/gateway/metrics.py), in the data folder; and the
# variable prometheus_client reads it from. Not imported from there: prometheus_client reads
# it when first imported, which must not be before `_share_metrics` has set it.
METRICS_DIR = "metrics"
SHARED_METRICS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


@click.command("serve")
@click.option("--host", help="Interface to listen on [default: from the config]")
@click.option("--port", type=click.IntRange(1, 65535), help="[default: from the config]")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    help="Worker processes [default: the config's, else one per core]",
)
@click.option(
    "--server",
    type=click.Choice(["uvicorn", "granian"]),
    default="uvicorn",
    show_default=True,
    help="The ASGI server",
)
@click.option(
    "--log-level", type=click.Choice(LEVELS), help="[default: from the config's [log] level]"
)
@with_data_dir
def serve(
    directory: Path,
    host: str | None,
    port: int | None,
    workers: int | None,
    server: str,
    log_level: Level | None,
) -> None:
    """Start the node."""
    config = require_config(directory)
    require_identity(directory)
    require_secrets(config)
    host = host or config.server.host
    port = port or config.server.port
    workers = workers or config.server.worker_count()
    try:
        with serving(directory):
            _serve(directory, config, host, port, workers, server, log_level)
    except FolderInUse as exc:
        fail(str(exc))


def _serve(
    directory: Path,
    config: Config,
    host: str,
    port: int,
    workers: int,
    server: str,
    log_level: Level | None,
) -> None:
    """The start, once the folder is ours: the address checked before the folder's state is
    recovered, so that a start that cannot serve changes nothing."""
    from node.cli.workers import refuse_taken

    try:
        refuse_taken(host, port)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    # Workers are separate processes: they find the node through the environment.
    os.environ["AIHUB_HOME"] = str(directory)
    _share_metrics(directory, workers)
    _share_cooldowns(directory, config, workers)
    logging_config = log_config(log_level or config.log.level, config.log.json, config.log.access)
    logging.config.dictConfig(logging_config)
    from node.storage import unreachable_errors

    try:
        asyncio.run(_recover(directory))
    except ConfigError as exc:
        fail(str(exc))
    except unreachable_errors() as exc:  # evaluated only when something was raised
        fail(f"the store cannot be reached: {exc}")
    url = f"http://{host}:{port}"
    console.print(
        f"aihub {__version__}: node [bold]{escape(config.node.name)}[/] serving "
        f"{escape(', '.join(d.name for d in config.models)) or 'no models'} at {url}/v1",
        highlight=False,
    )
    console.print(f'  curl {url}/v1/models -H "Authorization: Bearer $AIHUB_KEY"', highlight=False)
    # Invites and the node's descriptor carry the address it really serves on (`--port`
    # may differ from the config): `node.peers.address` reads it back.
    with _announced(directory, config, port), recorded(directory, host, port):
        if server == "granian":
            _run_granian(host, port, workers, config.server, logging_config)
        else:
            _run_uvicorn(host, port, workers, config.server, logging_config)


def _share_metrics(directory: Path, workers: int) -> None:
    """Under several workers, the folder in which every worker keeps its counters, so that a
    scrape of any of them answers the node's (node/gateway/metrics.py says how); emptied
    first, since a new start counts from zero as a single process does. Set before any
    worker starts, as prometheus_client reads it once, when first imported. One worker
    counts in memory: a folder named in the environment before (by hand, or a node started
    earlier in this process) is not used."""
    if workers == 1:
        os.environ.pop(SHARED_METRICS_VARIABLE, None)
        return
    folder = directory / METRICS_DIR
    folder.mkdir(mode=0o700, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink()
    os.environ[SHARED_METRICS_VARIABLE] = str(folder)


def _share_cooldowns(directory: Path, config: Config, workers: int) -> None:
    """Under several workers, the board on which they tell each other which deployments
    rest (node/gateway/cooldowns.py), clear; none for one."""
    from node.gateway.cooldowns import drop_board, make_board

    if workers == 1:
        drop_board(directory)
    else:
        make_board(directory, len(config.models))


async def _recover(directory: Path) -> None:
    """Before any worker starts, no request of this node's folder is in flight: usage a crash
    left in the journal is written. On the SQLite file, no other process serves the node
    either, so a reservation still held was left by a node that stopped mid-request (it
    would shrink its budget for the rest of the period) and is given back. On PostgreSQL,
    other processes (other hosts) serve the same budgets: what is reserved may be theirs, in
    flight, and is left alone (releasing it would let them pass a cap)."""
    from node.gateway.journal import JOURNAL_DIR, left_behind, replay
    from node.storage import is_postgres, opened

    segments = left_behind(directory / JOURNAL_DIR)
    target = store_target(directory)
    async with opened(**target._asdict()) as store:
        if not is_postgres(target.url):
            await store.spend.release_all_reservations()
        await replay(store, segments)


def _announced(
    directory: Path, config: Config, port: int
) -> contextlib.AbstractContextManager[Any]:
    """Announce the node over mDNS while it serves, if the config says so (carries no trust:
    it only lets `aihub peers discover` on the LAN find it)."""
    if not config.federation.mdns:
        return contextlib.nullcontext()
    from federation.discovery import announce
    from federation.identity import NodeIdentity

    identity = NodeIdentity.load(directory / IDENTITY_FILE)
    return announce(identity.node_id, port, config.federation.mdns_interface or None)


def _run_granian(
    host: str, port: int, workers: int, limits: ServerSection, logging_config: dict[str, Any]
) -> None:
    from granian import Granian
    from granian.constants import Interfaces
    from granian.http import HTTP1Settings

    # Granian has a head deadline and a bound on requests in flight, not the rest.
    Granian(
        "node.app:create_served_app",
        factory=True,
        address=host,
        port=port,
        workers=workers,
        interface=Interfaces.ASGI,
        http1_settings=HTTP1Settings(header_read_timeout=int(limits.header_timeout * 1000)),
        backpressure=limits.max_connections,
        log_dictconfig=logging_config,
        log_access=False,
    ).serve()


def _serve_one(config: uvicorn.Config) -> None:
    """As `uvicorn.run` serves one process, with the node's server (node/cli/server.py)."""
    from uvicorn.config import STARTUP_FAILURE

    from node.cli.server import LoggedServer

    server = LoggedServer(config)
    with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run: a second Ctrl-C
        server.run()
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)


def _run_uvicorn(
    host: str, port: int, workers: int, limits: ServerSection, logging_config: dict[str, Any]
) -> None:
    import uvicorn

    from node.ingress.connections import connection_limit, guarded_protocol

    limits = msgspec.structs.replace(
        limits, max_connections=connection_limit(limits.max_connections)
    )
    settings: dict[str, Any] = {
        "factory": True,
        "host": host,
        "port": port,
        "workers": workers,
        "loop": "uvloop",
        "http": guarded_protocol(limits),
        "timeout_keep_alive": limits.keepalive_timeout,
        # Each worker process applies the same logging config; the access log is ours.
        "log_config": logging_config,
        "access_log": False,
        "timeout_graceful_shutdown": 10,
    }
    config = uvicorn.Config("node.app:create_served_app", **settings)
    if workers == 1:
        _serve_one(config)
        return
    from node.cli.workers import SpreadWorkers, listening_sockets

    # A socket per worker, so that new connections are spread over the workers
    # (node/cli/workers.py says why uvicorn's one shared socket is not).
    try:
        sockets = listening_sockets(host, port, workers)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    SpreadWorkers(config, sockets).run()
