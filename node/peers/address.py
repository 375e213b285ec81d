"""Where peers reach this node: the URLs its descriptor and its invites carry.

`[federation] public_urls` decides when it is set (a public server behind a reverse proxy).
Otherwise the address is the one the node really serves on: `aihub serve` records it in the
data folder (`served.json`, with its process id) for as long as it runs, because `--host` and
`--port` may differ from `[server]` in the config, and the invite commands read it from there.
A node bound to every interface (`0.0.0.0`, `::`) is reached at this machine's own address.

An address only this machine (loopback) or only this network (private ranges) can reach makes
an invite another server cannot use: `reachability` says so in words, for the CLI to warn.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from node.config import Config
from node.pids import running

SERVED_FILE = "served.json"
ANY_INTERFACE = ("0.0.0.0", "::", "")


class Served(msgspec.Struct):
    """What `aihub serve` writes while it runs."""

    url: str
    pid: int


def _own_address() -> str:
    """This machine's address on its default route (no packet is sent: a UDP socket is only
    connected), for a node listening on every interface; loopback if there is no route."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere
        return str(probe.getsockname()[0])
    return "127.0.0.1"


def served_url(host: str, port: int) -> str:
    """The URL a node listening on `host:port` is reached at."""
    if host in ANY_INTERFACE:
        host = _own_address()
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return f"http://{host}:{port}"


@contextlib.contextmanager
def recorded(directory: Path, host: str, port: int) -> Iterator[str]:
    """Record, while the block runs, that this process serves the node on `host:port`."""
    url = served_url(host, port)
    path = directory / SERVED_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # as the folder's others
    with os.fdopen(fd, "wb") as file:
        file.write(msgspec.json.encode(Served(url, os.getpid())))
    try:
        yield url
    finally:
        with contextlib.suppress(OSError):
            if _read(path) == Served(url, os.getpid()):
                path.unlink()


def _read(path: Path) -> Served | None:
    try:
        return msgspec.json.decode(path.read_bytes()[:4096], type=Served)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def running_url(directory: Path) -> str | None:
    """The URL the node in `directory` is served on now, if an `aihub serve` runs for it."""
    served = _read(directory / SERVED_FILE)
    if served is None or not running(served.pid):
        return None
    return served.url


def advertised_urls(config: Config, directory: Path) -> list[str]:
    """The URLs peers are told to reach this node at: `public_urls` if set, else the address
    it is served on (else the config's `[server]`, for a node not running now)."""
    if config.federation.public_urls:
        return config.public_urls()
    url = running_url(directory)
    return [url] if url is not None else [served_url(config.server.host, config.server.port)]


def reachability(url: str) -> str | None:
    """Why another machine may not reach `url`, or None if nothing says it cannot."""
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return "loopback"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None  # a name: whoever resolves it decides
    if address.is_loopback:
        return "loopback"
    if address.is_private or address.is_link_local:
        return "private"
    return None


def reachability_warning(urls: list[str]) -> str | None:
    """A warning for an invite whose every URL is loopback-only or private, or None."""
    kinds = [reachability(url) for url in urls]
    if not urls or any(kind is None for kind in kinds):
        return None
    where = ", ".join(urls)
    if all(kind == "loopback" for kind in kinds):
        reach = "only from this machine (loopback)"
    else:
        reach = "only from this machine or its private network"
    return (
        f"this invite points at {where}, reachable {reach}: a node on another server "
        "cannot use it. Set [federation] public_urls in config.toml to the URL other servers "
        "reach this node at (e.g. https://hub.example.com), or serve with --host 0.0.0.0."
    )
