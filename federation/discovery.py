"""Discovery: finding other nodes over mDNS, through seeds and through peer exchange.

Discovery never grants trust: it only lists. What it finds becomes a peer only through an
invite or an approved join request (DESIGN.md, "Objects on the wire").

- **mDNS** (zeroconf). A node registers `_aihub._tcp.local.` under the instance name
  `aihub-<fingerprint>` with a TXT of only `id` (the short fingerprint of its node id, see
  `federation.descriptors.fingerprint`), `v` and `port`. IPv4 only: mDNS over IPv6 loopback
  does not work and a LAN node always has an IPv4 address. A find is worth nothing by itself:
  `discover` asks it for its signed descriptor at `http://<address>:<port>/federation/node`
  and keeps it only if the descriptor verifies and its node id has the fingerprint announced.
- **Seeds**: node URLs from the config, optionally pinned to a node id
  (`ed25519:…@https://host:8787`); a pinned seed that answers with another node's
  descriptor is refused.
- **Peer exchange**: each active peer is asked, with a signed request and the cross-node key
  it issued us, for the signed descriptors of its peers that chose to be listed
  (`GET /federation/peers` → `{"peers": [descriptor, ...]}`); each one is verified.

A discovered node is listed with the URLs it was reached at first (for a LAN node announced by
mDNS that is the only URL that certainly works: its descriptor may name a public or loopback
address), then the URLs its descriptor names.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import signal
import socket
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import ifaddr
import msgspec
from zeroconf import (
    InterfaceChoice,
    IPVersion,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from federation.descriptors import (
    FINGERPRINT_CHARS,
    NodeDescriptor,
    public_key_of,
    verify_descriptor,
)
from federation.descriptors import fingerprint as fingerprint
from federation.identity import NodeIdentity
from federation.sealing import SealError, unseal
from federation.transport import signed_headers
from ledger.nesting import bounded
from ledger.records import RecordError

log = logging.getLogger(__name__)

SERVICE_TYPE = "_aihub._tcp.local."
TXT_VERSION = "1"
INSTANCE_PREFIX = "aihub-"
NODE_PATH = "/federation/node"
PEERS_PATH = "/federation/peers"
# A descriptor is a few hundred bytes; a peer-exchange answer a few hundred descriptors.
MAX_DESCRIPTOR_BYTES = 64 * 1024
MAX_EXCHANGE_BYTES = 1024 * 1024
MAX_EXCHANGE_DESCRIPTORS = 1000
# Anyone on the LAN can announce services: a browse resolves this many names at most.
MAX_MDNS_SERVICES = 256
# How long browse_mdns waits, after its browsing window, for finds still being resolved.
RESOLVE_GRACE = 1.0

Via = Literal["mdns", "seed", "exchange"]
_FINGERPRINT = re.compile(rf"[a-z2-7]{{{FINGERPRINT_CHARS}}}")


class DiscoveryError(Exception):
    """A candidate that could not be discovered: unreachable, or not a valid node."""


@dataclass(frozen=True, slots=True)
class Seed:
    """A seed from the config: a node URL (no trailing slash), optionally pinned to a node id."""

    url: str
    node_id: str | None = None


@dataclass(frozen=True, slots=True)
class Found:
    """What an mDNS announcement says: nothing verified yet."""

    fingerprint: str
    addresses: tuple[str, ...]
    port: int


@dataclass(frozen=True, slots=True)
class Discovered:
    """A node whose signed descriptor verified: who it is and where it was reached."""

    node_id: str
    name: str
    urls: tuple[str, ...]
    via: Via


def _log_problem(message: str) -> None:
    log.warning("discovery: %s", message)


# --- seeds ----------------------------------------------------------------------------------


def parse_seed(text: str) -> Seed:
    """`https://host:8787` or `ed25519:<key>@https://host:8787`; ValueError saying what is
    wrong otherwise. A URL may carry a path prefix (a node behind a reverse proxy), but no
    user info, query or fragment."""
    if not isinstance(text, str):
        raise ValueError(f"a seed is a string, not {type(text).__name__}")
    seed = text.strip()
    node_id: str | None = None
    url = seed
    if seed.startswith("ed25519:"):
        node_id, at, url = seed.partition("@")
        if not at:
            raise ValueError(
                f"seed {text!r}: a pinned seed is <node id>@<url>, e.g. ed25519:…@https://host:8787"
            )
        try:
            public_key_of(node_id)
        except ValueError as exc:
            raise ValueError(f"seed {text!r}: bad node id: {exc}") from exc
    if not url:
        raise ValueError("empty seed")
    if any(char.isspace() for char in url):
        raise ValueError(f"seed {text!r}: a URL cannot contain whitespace")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"seed {text!r}: the URL must start with http:// or https://")
    if "@" in parts.netloc:
        raise ValueError(f"seed {text!r}: a seed URL cannot carry user info (user@host)")
    if not parts.hostname:
        raise ValueError(f"seed {text!r}: the URL has no host")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError as exc:
        raise ValueError(f"seed {text!r}: bad port in the URL") from exc
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ValueError(f"seed {text!r}: a seed URL has no query or fragment")
    if len(url) > 2000:
        raise ValueError(f"seed {text[:40]!r}…: URL too long")
    return Seed(url.rstrip("/"), node_id)


# --- mDNS: announcing -----------------------------------------------------------------------


def interface_address(interface: str) -> str:
    """The IPv4 address to use for mDNS: `interface` itself if it is one, else the first IPv4
    address of the network interface of that name (e.g. `eth0`); ValueError otherwise."""
    try:
        address = ipaddress.ip_address(interface)
    except ValueError:
        pass
    else:
        if address.version != 4:
            raise ValueError(f"mDNS interface {interface!r}: only IPv4 addresses are supported")
        return str(address)
    for adapter in ifaddr.get_adapters():
        if adapter.name == interface:
            for ip in adapter.ips:
                if ip.is_IPv4:
                    return str(ip.ip)
            raise ValueError(f"mDNS interface {interface!r} has no IPv4 address")
    raise ValueError(f"mDNS interface {interface!r}: no such IPv4 address or interface")


def _interfaces(interface: str | None) -> list[str] | InterfaceChoice:
    """What zeroconf should bind: one IPv4 address, or every interface (None, "" or
    "0.0.0.0")."""
    address = interface_address(interface) if interface else None
    if address is None or ipaddress.ip_address(address).is_unspecified:
        return InterfaceChoice.All
    return [address]


def _all_ipv4_addresses() -> list[str]:
    """Every IPv4 address of this host but loopback, unless loopback is all there is."""
    addresses = sorted(
        {str(ip.ip) for adapter in ifaddr.get_adapters() for ip in adapter.ips if ip.is_IPv4}
    )
    outside = [a for a in addresses if not ipaddress.ip_address(a).is_loopback]
    return outside or addresses


def instance_name(node_id: str) -> str:
    return f"{INSTANCE_PREFIX}{fingerprint(node_id)}.{SERVICE_TYPE}"


def service_info(node_id: str, port: int, addresses: Sequence[str]) -> ServiceInfo:
    """The mDNS service a node registers: its TXT holds only `id`, `v` and `port`."""
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    fp = fingerprint(node_id)
    return ServiceInfo(
        SERVICE_TYPE,
        instance_name(node_id),
        addresses=[socket.inet_aton(address) for address in addresses],
        port=port,
        properties={"id": fp, "v": TXT_VERSION, "port": str(port)},
        server=f"{INSTANCE_PREFIX}{fp}.local.",
    )


class Announcement:
    """A registered (or registering) mDNS service; see `announce`."""

    def __init__(self, zeroconf: Zeroconf, info: ServiceInfo, registration: Future[Any]) -> None:
        self.zeroconf = zeroconf
        self.info = info
        self.registration = registration

    @property
    def addresses(self) -> list[str]:
        return self.info.parsed_addresses(IPVersion.V4Only)

    def wait(self, timeout: float) -> bool:
        """Block until the name is probed and claimed (about 1.5 s); True if it was."""
        try:
            self.registration.result(timeout)
        except Exception:  # failures are logged by the registration's done callback
            return False
        return True


@contextlib.contextmanager
def announce(node_id: str, port: int, interface: str | None) -> Iterator[Announcement | None]:
    """Announce this node over mDNS while the block runs; unregister (goodbye packets) after.

    `interface`: an IPv4 address (or an interface name) to announce on; None: every IPv4
    interface. Zeroconf runs in its own thread and the name is probed and claimed in the
    background, so the block (e.g. the server) starts at once. mDNS is a convenience: if it
    cannot start, a warning is logged and the block runs anyway (the value is then None).

    Meant to wrap the server from the main thread, before it starts (as `aihub serve` does):
    there, a SIGTERM that would kill the process outright is turned into SystemExit, so that
    the block unwinds and the goodbye packets go out (see `_exit_cleanly_on_sigterm`).
    """
    try:
        interfaces = _interfaces(interface)
        addresses = interfaces if isinstance(interfaces, list) else _all_ipv4_addresses()
        info = service_info(node_id, port, addresses)
        zeroconf = Zeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only, use_asyncio=False)
    except Exception as exc:  # mDNS must never stop the node: say why and go on
        log.warning("mDNS announcement not started (%s): %s", interface or "all interfaces", exc)
        yield None
        return
    assert zeroconf.loop is not None
    registration = asyncio.run_coroutine_threadsafe(
        zeroconf.async_register_service(info), zeroconf.loop
    )

    def registered(future: Future[Any]) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            log.warning("mDNS announcement failed: %s: %s", type(error).__name__, error)
        else:
            log.info("mDNS: announced %s on %s port %d", info.name, ", ".join(addresses), port)

    registration.add_done_callback(registered)
    previous = _exit_cleanly_on_sigterm()
    try:
        yield Announcement(zeroconf, info, registration)
    finally:
        registration.cancel()
        try:
            zeroconf.close()  # unregisters what was registered: goodbye packets
        except Exception as exc:
            log.warning("mDNS: closing failed: %s", exc)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_system_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _exit_cleanly_on_sigterm() -> Any:
    """Make SIGTERM (systemd, docker stop) unwind the stack instead of killing the process,
    so that the goodbye packets go out. Only where the signal would otherwise kill outright:
    in the main thread, with the default handler. uvicorn shuts down gracefully on SIGTERM,
    then restores this handler and raises the signal again, which lands here. Answers the
    handler to restore afterwards, or None if nothing was changed."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None
    return signal.signal(signal.SIGTERM, _raise_system_exit)


# --- mDNS: browsing -------------------------------------------------------------------------


def _text(properties: dict[bytes, bytes | None], key: bytes) -> str | None:
    value = properties.get(key)
    if value is None:
        return None
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        return None


def found_from_info(info: ServiceInfo) -> Found | None:
    """The Found an announcement describes, or None if it is not a usable aihub announcement."""
    properties = info.properties or {}
    if _text(properties, b"v") != TXT_VERSION:
        return None
    fp = _text(properties, b"id")
    if fp is None or not _FINGERPRINT.fullmatch(fp):
        return None
    port = info.port
    txt_port = _text(properties, b"port")
    if txt_port is not None and txt_port.isdigit() and 1 <= int(txt_port) <= 65535:
        port = int(txt_port)
    addresses = tuple(info.parsed_addresses(IPVersion.V4Only))
    if not port or not addresses:
        return None
    return Found(fp, addresses, port)


async def browse_mdns(timeout: float, interface: str | None) -> list[Found]:  # noqa: ASYNC109
    """Listen for `_aihub._tcp.local.` announcements for `timeout` seconds (IPv4; on
    `interface`, an IPv4 address or interface name, else on all interfaces)."""
    aiozc = AsyncZeroconf(interfaces=_interfaces(interface), ip_version=IPVersion.V4Only)
    resolving: dict[str, asyncio.Task[Found | None]] = {}
    resolve_ms = int(max(timeout, 1.0) * 1000)

    async def resolve(name: str) -> Found | None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(aiozc.zeroconf, resolve_ms):
            return None
        return found_from_info(info)

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            task = resolving.pop(name, None)
            if task is not None:
                task.cancel()
        elif name not in resolving and len(resolving) >= MAX_MDNS_SERVICES:
            return
        elif name not in resolving or state_change is ServiceStateChange.Updated:
            old = resolving.get(name)
            if old is not None:
                old.cancel()
            resolving[name] = asyncio.ensure_future(resolve(name))

    browser = AsyncServiceBrowser(aiozc.zeroconf, [SERVICE_TYPE], handlers=[on_change])
    try:
        await asyncio.sleep(timeout)
        await browser.async_cancel()
        tasks = list(resolving.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=RESOLVE_GRACE)
            for task in pending:
                task.cancel()
    finally:
        with contextlib.suppress(Exception):
            await browser.async_cancel()
        for task in resolving.values():
            task.cancel()
        await aiozc.async_close()
    by_fingerprint: dict[str, Found] = {}
    for task in tasks:
        if task.cancelled() or not task.done() or task.exception() is not None:
            continue
        found = task.result()
        if found is None:
            continue
        known = by_fingerprint.get(found.fingerprint)
        if known is not None:  # the same node under another name: merge its addresses
            addresses = tuple(dict.fromkeys(known.addresses + found.addresses))
            found = Found(found.fingerprint, addresses, known.port)
        by_fingerprint[found.fingerprint] = found
    return sorted(by_fingerprint.values(), key=lambda f: f.fingerprint)


# --- verifying candidates ---------------------------------------------------------------------


def _describe(exc: Exception) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _read_limited(response: httpx.Response, limit: int) -> bytes:
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            raise DiscoveryError(f"answer larger than {limit} bytes")
    return bytes(body)


async def fetch_descriptor(
    client: httpx.AsyncClient,
    url: str,
    *,
    pinned: str | None = None,
    request_timeout: float = 5.0,
) -> NodeDescriptor:
    """The verified descriptor the node at `url` serves at /federation/node (signed by
    `pinned` if given); DiscoveryError saying why not otherwise."""
    target = url.rstrip("/") + NODE_PATH
    try:
        async with client.stream("GET", target, timeout=request_timeout) as response:
            if response.status_code != 200:
                raise DiscoveryError(f"{NODE_PATH} answered HTTP {response.status_code}")
            body = await _read_limited(response, MAX_DESCRIPTOR_BYTES)
    except httpx.HTTPError as exc:
        raise DiscoveryError(f"{url}: unreachable ({_describe(exc)})") from exc
    except httpx.InvalidURL as exc:
        raise DiscoveryError(f"{url}: invalid URL ({exc})") from exc
    except DiscoveryError as exc:
        raise DiscoveryError(f"{url}: {exc}") from exc
    try:
        return verify_descriptor(body, pinned=pinned)
    except RecordError as exc:
        raise DiscoveryError(f"{url}: descriptor refused: {exc}") from exc


async def _from_seed(
    client: httpx.AsyncClient, seed: Seed, request_timeout: float
) -> tuple[NodeDescriptor, str]:
    return await fetch_descriptor(
        client, seed.url, pinned=seed.node_id, request_timeout=request_timeout
    ), seed.url


async def _from_found(
    client: httpx.AsyncClient, found: Found, request_timeout: float
) -> tuple[NodeDescriptor, str]:
    """The first of the find's addresses that serves a descriptor with the fingerprint it
    announced."""
    errors = []
    for address in found.addresses:
        url = f"http://{address}:{found.port}"
        try:
            descriptor = await fetch_descriptor(client, url, request_timeout=request_timeout)
        except DiscoveryError as exc:
            errors.append(str(exc))
            continue
        if fingerprint(descriptor.node_id) != found.fingerprint:
            errors.append(
                f"{url}: announced fingerprint {found.fingerprint} but serves node "
                f"{descriptor.node_id} (fingerprint {fingerprint(descriptor.node_id)}): refused"
            )
            continue
        return descriptor, url
    raise DiscoveryError("mDNS " + found.fingerprint + ": " + "; ".join(errors))


async def discover(
    client: httpx.AsyncClient,
    *,
    seeds: Iterable[str | Seed] = (),
    mdns: bool = False,
    interface: str | None = None,
    timeout: float = 3.0,  # noqa: ASYNC109 - the browsing window, and each request's timeout
    exchange: Iterable[NodeDescriptor] = (),
    self_id: str | None = None,
    exclude: Collection[str] = (),
    on_problem: Callable[[str], None] | None = None,
) -> list[Discovered]:
    """Every node found over mDNS (browsing for `timeout` seconds), through `seeds` and in
    `exchange` (descriptors from `exchange_descriptors`, already verified), whose descriptor
    verifies; one entry per node id, without `self_id` and `exclude`. Each candidate that
    fails is reported to `on_problem` (default: a logged warning) and never stops the others.
    """
    report = on_problem or _log_problem
    skip = set(exclude)
    if self_id is not None:
        skip.add(self_id)
    # mDNS finds of ourselves and of known nodes are not even asked for their descriptor.
    skip_fingerprints = set()
    for node_id in skip:
        with contextlib.suppress(ValueError):
            skip_fingerprints.add(fingerprint(node_id))

    parsed: list[Seed] = []
    for seed in seeds:
        if isinstance(seed, Seed):
            parsed.append(seed)
            continue
        try:
            parsed.append(parse_seed(seed))
        except ValueError as exc:
            report(str(exc))

    async def browse() -> list[tuple[NodeDescriptor, str]]:
        try:
            finds = await browse_mdns(timeout, interface)
        except Exception as exc:  # no multicast here, bad interface...: say so, go on
            report(f"mDNS browsing failed: {type(exc).__name__}: {exc}")
            return []
        fresh = [found for found in finds if found.fingerprint not in skip_fingerprints]
        return await gather(_from_found(client, found, timeout) for found in fresh)

    async def gather(
        attempts: Iterable[Any],
    ) -> list[tuple[NodeDescriptor, str]]:
        results = await asyncio.gather(*attempts, return_exceptions=True)
        ok = []
        for result in results:
            if isinstance(result, DiscoveryError):
                report(str(result))
            elif isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                report(f"{type(result).__name__}: {result}")
            else:
                ok.append(result)
        return ok

    async def nothing() -> list[tuple[NodeDescriptor, str]]:
        return []

    from_mdns, from_seeds = await asyncio.gather(
        browse() if mdns else nothing(),
        gather(_from_seed(client, seed, timeout) for seed in parsed if seed.node_id not in skip),
    )

    nodes: dict[str, Discovered] = {}
    candidates: list[tuple[NodeDescriptor, str | None, Via]] = [
        *((d, url, "mdns") for d, url in from_mdns),
        *((d, url, "seed") for d, url in from_seeds),
        *((d, None, "exchange") for d in exchange),
    ]
    for descriptor, reached, via in candidates:
        if descriptor.node_id in skip:
            continue
        urls = ([reached] if reached else []) + list(descriptor.urls)
        known = nodes.get(descriptor.node_id)
        if known is not None:
            merged = tuple(dict.fromkeys([*known.urls, *urls]))
            nodes[descriptor.node_id] = Discovered(known.node_id, known.name, merged, known.via)
        else:
            nodes[descriptor.node_id] = Discovered(
                descriptor.node_id, descriptor.name, tuple(dict.fromkeys(urls)), via
            )
    return sorted(nodes.values(), key=lambda d: (d.name, d.node_id))


# --- peer exchange (client side) --------------------------------------------------------------


class _ExchangeAnswer(msgspec.Struct):
    peers: list[Any]


async def _exchange_with(
    client: httpx.AsyncClient,
    identity: NodeIdentity,
    peer_id: str,
    urls: Sequence[str],
    key: str,
    request_timeout: float,
) -> list[Any]:
    errors = []
    for base in urls:
        url = base.rstrip("/") + PEERS_PATH
        headers = signed_headers(identity, "GET", url, key=key)
        try:
            async with client.stream(
                "GET", url, headers=headers, timeout=request_timeout
            ) as response:
                if response.status_code != 200:
                    errors.append(f"{url}: HTTP {response.status_code}")
                    continue
                body = await _read_limited(response, MAX_EXCHANGE_BYTES)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            errors.append(f"{url}: unreachable ({_describe(exc)})")
            continue
        except DiscoveryError as exc:
            errors.append(f"{url}: {exc}")
            continue
        try:
            answer = msgspec.json.decode(bounded(body), type=_ExchangeAnswer)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            raise DiscoveryError(f"peer {peer_id}: bad peer-exchange answer: {exc}") from exc
        return answer.peers
    raise DiscoveryError(f"peer exchange with {peer_id}: " + ("; ".join(errors) or "no URL"))


async def exchange_descriptors(
    client: httpx.AsyncClient,
    identity: NodeIdentity,
    peers: Iterable[Any],
    *,
    request_timeout: float = 5.0,
    on_problem: Callable[[str], None] | None = None,
) -> list[NodeDescriptor]:
    """Ask every active peer (`node.storage.records.PeerRecord`s) for the descriptors of its listed
    peers: a signed `GET /federation/peers` with the cross-node key it issued us. Each
    descriptor is verified; one per node id (the newest). Problems go to `on_problem`."""
    report = on_problem or _log_problem
    asks = []
    for record in peers:
        if record.status != "active" or not record.key_from_them:
            continue
        try:
            stored = msgspec.json.decode(record.descriptor)
            urls = [u for u in stored.get("urls", []) if isinstance(u, str)]
            key = unseal(identity, record.key_from_them).decode()
        except (msgspec.DecodeError, AttributeError, SealError, UnicodeDecodeError) as exc:
            report(f"peer {record.node_id}: cannot ask it for peers: {exc}")
            continue
        asks.append(
            (
                record.node_id,
                _exchange_with(client, identity, record.node_id, urls, key, request_timeout),
            )
        )
    results = await asyncio.gather(*(ask for _, ask in asks), return_exceptions=True)
    newest: dict[str, NodeDescriptor] = {}
    for (peer_id, _), result in zip(asks, results, strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, Exception):
                raise result
            report(str(result) if isinstance(result, DiscoveryError) else f"{peer_id}: {result}")
            continue
        if len(result) > MAX_EXCHANGE_DESCRIPTORS:
            report(
                f"peer {peer_id} named {len(result)} nodes; only the first "
                f"{MAX_EXCHANGE_DESCRIPTORS} are read"
            )
        for item in result[:MAX_EXCHANGE_DESCRIPTORS]:
            if not isinstance(item, dict):
                report(f"peer {peer_id} passed on something that is not a descriptor")
                continue
            try:
                descriptor = verify_descriptor(item)
            except RecordError as exc:
                report(f"peer {peer_id} passed on a descriptor that is refused: {exc}")
                continue
            known = newest.get(descriptor.node_id)
            if known is None or descriptor.iat > known.iat:
                newest[descriptor.node_id] = descriptor
    return list(newest.values())
