"""Discovery: seeds, peer exchange and mDNS, over real HTTP and real multicast.

mDNS runs for real twice: on loopback (127.0.0.1: no root needed, nothing leaves the host),
and between three network namespaces joined by a bridge in a fourth (root only: the test
creates the namespaces and removes them, and never touches the host's own interfaces).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import httpx
import msgspec
import nacl.signing
import pytest
from click.testing import CliRunner
from litestar import Litestar, Request, Response, get
from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from federation import discovery
from federation.descriptors import NodeDescriptor, make_descriptor, verify_descriptor
from federation.discovery import (
    SERVICE_TYPE,
    Found,
    Seed,
    announce,
    browse_mdns,
    discover,
    exchange_descriptors,
    fingerprint,
    instance_name,
    parse_seed,
    service_info,
)
from federation.httpsig import REQUEST_ID_HEADER, SignatureError, verify_request
from federation.identity import NodeIdentity
from federation.nonces import NonceCache
from federation.sealing import seal_for
from node.cli.discovery import peers_discover
from node.config import DATABASE_FILE, IDENTITY_FILE
from node.provision import create_node
from node.storage import open_store
from node.storage.records import PeerRecord
from tests.conftest import NodeDir, run_node
from tests.mocks.server import free_port, serve_app

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
BROWSE_SECONDS = 1.5


def new_node(tmp_path: Path, name: str, folder: str | None = None) -> tuple[NodeDir, NodeIdentity]:
    path = tmp_path / (folder or name)
    identity, key = create_node(path, name)
    return NodeDir(path, key), identity


def descriptor_app(body: bytes, status: int = 200) -> Litestar:
    """A stand-in node that serves `body` at GET /federation/node."""

    @get("/federation/node")
    async def node() -> Response[bytes]:
        return Response(body, status_code=status, media_type="application/json")

    return Litestar([node])


def encoded(descriptor: NodeDescriptor) -> bytes:
    return msgspec.json.encode(descriptor)


def tampered(descriptor: NodeDescriptor, **changes: object) -> bytes:
    fields = msgspec.to_builtins(descriptor)
    fields.update(changes)
    return msgspec.json.encode(fields)


async def run_discover(**kwargs: object) -> tuple[list[discovery.Discovered], list[str]]:
    problems: list[str] = []
    async with httpx.AsyncClient() as client:
        found = await discover(client, on_problem=problems.append, **kwargs)  # type: ignore[arg-type]
    return found, problems


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[dict[str, tuple[Any, NodeIdentity]]]:
    """Bob and Carol served for real on loopback ports; Alice (us) only as a folder."""
    made = {name: new_node(tmp_path, name) for name in ("alice", "bob", "carol")}
    with run_node(made["bob"][0]) as bob, run_node(made["carol"][0]) as carol:
        yield {
            "alice": made["alice"],  # (NodeDir, identity): not running
            "bob": (bob, made["bob"][1]),
            "carol": (carol, made["carol"][1]),
        }


# --- seeds and fingerprints -----------------------------------------------------------------


NODE_ID = NodeIdentity(nacl.signing.SigningKey(bytes(range(32)))).node_id


@pytest.mark.parametrize(
    ("text", "url", "node_id"),
    [
        ("https://hub.example.org:8787", "https://hub.example.org:8787", None),
        ("  http://10.0.0.5:8787/ ", "http://10.0.0.5:8787", None),
        ("https://example.org/aihub/", "https://example.org/aihub", None),
        ("http://[::1]:8787", "http://[::1]:8787", None),
        (f"{NODE_ID}@https://hub.example.org:8787", "https://hub.example.org:8787", NODE_ID),
    ],
)
def test_parse_seed(text: str, url: str, node_id: str | None) -> None:
    assert parse_seed(text) == Seed(url, node_id)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty seed"),
        ("hub.example.org:8787", "http:// or https://"),
        ("ftp://hub.example.org", "http:// or https://"),
        ("https://", "no host"),
        ("https://user:pw@hub.example.org", "user info"),
        ("https://hub.example.org:99999", "bad port"),
        ("https://hub.example.org/?x=1", "no query"),
        ("https://hub.example.org/#top", "no query or fragment"),
        ("https://hub example.org", "whitespace"),
        (f"{NODE_ID}https://hub.example.org", "<node id>@<url>"),
        (f"{NODE_ID}@", "empty seed"),
        (f"{NODE_ID[:-2]}@https://hub.example.org", "bad node id"),
        ("ed25519:!!!@https://hub.example.org", "bad node id"),
        (f"{NODE_ID}@ftp://hub.example.org", "http:// or https://"),
    ],
)
def test_parse_seed_refuses(text: str, says: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_seed(text)
    assert says in str(caught.value)


def test_fingerprint_is_short_stable_dns_safe_and_distinct() -> None:
    ids = [NodeIdentity.generate().node_id for _ in range(50)]
    prints = [fingerprint(node_id) for node_id in ids]
    assert len(set(prints)) == len(ids)
    for node_id, fp in zip(ids, prints, strict=True):
        assert fp == fingerprint(node_id)
        assert len(fp) == 16
        assert fp.isalnum() and fp == fp.lower()
        assert instance_name(node_id) == f"aihub-{fp}.{SERVICE_TYPE}"
    with pytest.raises(ValueError):
        fingerprint("ed25519:not-a-key")


def test_service_txt_carries_only_id_version_and_port() -> None:
    info = service_info(NODE_ID, 8787, ["192.0.2.7"])
    assert info.properties == {b"id": fingerprint(NODE_ID).encode(), b"v": b"1", b"port": b"8787"}
    assert info.port == 8787
    assert info.parsed_addresses() == ["192.0.2.7"]
    assert info.type == SERVICE_TYPE
    with pytest.raises(ValueError):
        service_info(NODE_ID, 0, ["192.0.2.7"])


# --- seeds over real HTTP -------------------------------------------------------------------


async def test_discover_through_seeds_lists_real_nodes(nodes) -> None:
    (bob, bob_id), (carol, carol_id) = nodes["bob"], nodes["carol"]
    alice_id = nodes["alice"][1]
    with run_node(nodes["alice"][0]) as alice:
        found, problems = await run_discover(
            seeds=[
                bob.url,
                bob.url + "/",  # the same node twice: listed once
                f"{carol_id.node_id}@{carol.url}",
                alice.url,  # ourselves: never listed
            ],
            self_id=alice_id.node_id,
            timeout=5,
        )
    assert problems == []
    assert [(d.name, d.node_id, d.via) for d in found] == [
        ("bob", bob_id.node_id, "seed"),
        ("carol", carol_id.node_id, "seed"),
    ]
    # Reached first, then what the descriptor names (the config's default URL here).
    assert found[0].urls == (bob.url, "http://127.0.0.1:8787")
    assert found[1].urls[0] == carol.url


async def test_a_wrong_pin_is_refused_and_others_still_listed(nodes) -> None:
    (bob, _), (carol, carol_id) = nodes["bob"], nodes["carol"]
    # Bob's URL pinned to Carol's id: Bob answers with his own (valid) descriptor.
    found, problems = await run_discover(
        seeds=[f"{carol_id.node_id}@{bob.url}", carol.url], timeout=5
    )
    assert [d.node_id for d in found] == [carol_id.node_id]
    assert len(problems) == 1
    assert bob.url in problems[0] and "pinned" in problems[0]


def test_verify_descriptor_with_a_pin() -> None:
    one, other = NodeIdentity.generate(), NodeIdentity.generate()
    body = encoded(make_descriptor(one, "one", ["http://192.0.2.1:8787"]))
    assert verify_descriptor(body, pinned=one.node_id).node_id == one.node_id
    with pytest.raises(ValueError, match="pinned"):
        verify_descriptor(body, pinned=other.node_id)


async def test_bad_candidates_never_stop_the_others(nodes) -> None:
    bob, bob_id = nodes["bob"]
    mallory = NodeIdentity.generate()
    good = make_descriptor(mallory, "mallory", ["http://192.0.2.9:8787"])
    expired = make_descriptor(mallory, "mallory", ["http://192.0.2.9:8787"], ttl=60, now=1)
    huge = b'{"v":1,"name":"' + b"x" * (discovery.MAX_DESCRIPTOR_BYTES + 10) + b'"}'
    closed = f"http://127.0.0.1:{free_port()}"
    with (
        serve_app(descriptor_app(tampered(good, name="not-mallory"))) as renamed,
        serve_app(descriptor_app(tampered(good, urls=["http://evil.example"]))) as moved,
        serve_app(descriptor_app(encoded(expired))) as stale,
        serve_app(descriptor_app(b"<html>hello</html>")) as html,
        serve_app(descriptor_app(encoded(good), status=404)) as missing,
        serve_app(descriptor_app(huge)) as oversized,
    ):
        seeds = [closed, renamed, moved, stale, html, missing, oversized, "ftp://nope", bob.url]
        found, problems = await run_discover(seeds=seeds, timeout=5)
    assert [d.node_id for d in found] == [bob_id.node_id]
    assert len(problems) == 8, problems
    text = "\n".join(problems)
    for fragment in (closed, renamed, moved, stale, html, missing, oversized, "ftp://nope"):
        assert fragment in text
    assert "HTTP 404" in text and "larger than" in text and "unreachable" in text


async def test_mdns_finds_are_verified_against_their_fingerprint(nodes, monkeypatch) -> None:
    (bob, bob_id), (carol, carol_id) = nodes["bob"], nodes["carol"]
    alice_id = nodes["alice"][1]
    bob_port = int(bob.url.rsplit(":", 1)[1])
    carol_port = int(carol.url.rsplit(":", 1)[1])
    announced = [
        Found(fingerprint(bob_id.node_id), ("127.0.0.1",), bob_port),
        # Something at Carol's address claims to be another node: refused.
        Found(fingerprint(NodeIdentity.generate().node_id), ("127.0.0.1",), carol_port),
        # Our own announcement, and that of a known peer: not even asked.
        Found(fingerprint(alice_id.node_id), ("127.0.0.1",), free_port()),
        Found(fingerprint(carol_id.node_id), ("127.0.0.1",), free_port()),
    ]
    calls = []

    async def fake_browse(seconds: float, interface: str | None) -> list[Found]:
        calls.append((seconds, interface))
        return announced

    monkeypatch.setattr(discovery, "browse_mdns", fake_browse)
    found, problems = await run_discover(
        mdns=True,
        interface="127.0.0.1",
        timeout=2,
        self_id=alice_id.node_id,
        exclude={carol_id.node_id},
    )
    assert calls == [(2, "127.0.0.1")]
    assert [(d.node_id, d.via, d.urls[0]) for d in found] == [
        (bob_id.node_id, "mdns", f"http://127.0.0.1:{bob_port}")
    ]
    assert len(problems) == 1 and "announced fingerprint" in problems[0], problems


async def test_mdns_browsing_failure_is_a_problem_not_an_error(nodes, monkeypatch) -> None:
    bob, bob_id = nodes["bob"]

    async def broken_browse(seconds: float, interface: str | None) -> list[Found]:
        raise OSError(19, "No such device")

    monkeypatch.setattr(discovery, "browse_mdns", broken_browse)
    found, problems = await run_discover(mdns=True, seeds=[bob.url], timeout=2)
    assert [d.node_id for d in found] == [bob_id.node_id]
    assert len(problems) == 1 and "mDNS browsing failed" in problems[0]


# --- peer exchange --------------------------------------------------------------------------


class ExchangeStandIn:
    """A peer's GET /federation/peers: checks the cross-node key and our request signature
    the way a node does, and answers with the descriptors it was given."""

    def __init__(self, caller: NodeIdentity, key: str, peers: list[object]) -> None:
        self.caller, self.key, self.peers = caller, key, peers
        self.nonces = NonceCache()
        self.seen: list[str] = []

        @get("/federation/peers")
        async def listed(request: Request) -> Response[bytes]:
            if request.headers.get("authorization") != f"Bearer {self.key}":
                return Response(b'{"error":"bad key"}', status_code=401)
            try:
                signer = verify_request(
                    "GET",
                    str(request.url),
                    request.headers,
                    await request.body(),
                    public_key_for=self.known,
                    nonces=self.nonces,
                )
            except SignatureError as exc:
                return Response(str(exc).encode(), status_code=401)
            self.seen.append(request.headers[REQUEST_ID_HEADER])
            assert signer == caller.node_id
            return Response(msgspec.json.encode({"peers": self.peers}))

        self.app = Litestar([listed])

    def known(self, key_id: str) -> bytes | None:
        return bytes(self.caller.verify_key) if key_id == self.caller.node_id else None


def peer_record(
    us: NodeIdentity, peer: NodeIdentity, url: str, key: str, status: str = "active"
) -> PeerRecord:
    descriptor = make_descriptor(peer, "peer", [url])
    return PeerRecord(
        node_id=peer.node_id,
        name="peer",
        descriptor=msgspec.json.encode(descriptor).decode(),
        status=status,  # type: ignore[arg-type]
        created_at=int(time.time()),
        key_from_them=seal_for(us.node_id, key.encode()),
    )


async def test_peer_exchange_is_signed_and_every_descriptor_verified() -> None:
    us, dave, erin, frank = (NodeIdentity.generate() for _ in range(4))
    erin_desc = make_descriptor(erin, "erin", ["https://erin.example:8787"])
    frank_desc = make_descriptor(frank, "frank", ["https://frank.example:8787"])
    older_erin = make_descriptor(erin, "erin-old", ["https://erin.example:8787"], now=1_000)
    answer: list[object] = [
        msgspec.to_builtins(erin_desc),
        msgspec.to_builtins(frank_desc),
        msgspec.to_builtins(older_erin),  # expired long ago: refused
        msgspec.json.decode(tampered(frank_desc, name="frankly-not")),  # forged: refused
        "not a descriptor",
    ]
    stand_in = ExchangeStandIn(us, "sk-hub-dave-for-us", answer)
    revoked_peer = NodeIdentity.generate()
    with serve_app(stand_in.app) as dave_url:
        records = [
            peer_record(us, dave, dave_url, "sk-hub-dave-for-us"),
            # Revoked: never asked.
            peer_record(us, revoked_peer, dave_url, "sk-hub-dave-for-us", status="revoked"),
            # Unreachable: a problem, and the others still answer.
            peer_record(us, NodeIdentity.generate(), f"http://127.0.0.1:{free_port()}", "k"),
            # A key sealed to someone else: a problem.
            peer_record(NodeIdentity.generate(), NodeIdentity.generate(), dave_url, "k"),
        ]
        problems: list[str] = []
        async with httpx.AsyncClient() as client:
            got = await exchange_descriptors(client, us, records, on_problem=problems.append)
    assert len(stand_in.seen) == 1 and stand_in.seen[0].startswith("req_")
    assert sorted(d.name for d in got) == ["erin", "frank"]
    assert {d.node_id for d in got} == {erin.node_id, frank.node_id}
    assert len(problems) == 5, problems
    text = "\n".join(problems)
    assert "unreachable" in text and "cannot ask it" in text and "not a descriptor" in text

    found, problems = await run_discover(exchange=got, exclude={frank.node_id})
    assert [(d.name, d.via, d.urls) for d in found] == [
        ("erin", "exchange", ("https://erin.example:8787",))
    ]
    assert problems == []


async def test_peer_exchange_refuses_a_malformed_answer() -> None:
    us, dave = NodeIdentity.generate(), NodeIdentity.generate()

    @get("/federation/peers")
    async def listed() -> Response[bytes]:
        return Response(b'{"peers": "everyone"}')

    with serve_app(Litestar([listed])) as url:
        problems: list[str] = []
        async with httpx.AsyncClient() as client:
            got = await exchange_descriptors(
                client, us, [peer_record(us, dave, url, "k")], on_problem=problems.append
            )
    assert got == []
    assert len(problems) == 1 and "bad peer-exchange answer" in problems[0]


# --- mDNS on loopback -----------------------------------------------------------------------


async def test_mdns_announce_and_browse_on_loopback() -> None:
    """No root needed: zeroconf bound to 127.0.0.1 multicasts over `lo` even without its
    MULTICAST flag, and nothing leaves the host."""
    node = NodeIdentity.generate()
    name, port = instance_name(node.node_id), free_port()
    events: list[ServiceStateChange] = []

    def watch(
        zeroconf: object, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if name == instance_name(node.node_id):
            events.append(state_change)

    async with AsyncZeroconf(interfaces=[LOOPBACK], ip_version=IPVersion.V4Only) as watcher:
        browser = AsyncServiceBrowser(watcher.zeroconf, [SERVICE_TYPE], handlers=[watch])
        with announce(node.node_id, port, LOOPBACK) as announcement:
            assert announcement is not None
            assert await asyncio.to_thread(announcement.wait, 10)
            finds = await browse_mdns(BROWSE_SECONDS, LOOPBACK)
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            assert await info.async_request(watcher.zeroconf, 3000)
        # Leaving the block said goodbye (TTL 0): a browser that saw the node sees it go,
        # long before its records would expire.
        for _ in range(50):
            if ServiceStateChange.Removed in events:
                break
            await asyncio.sleep(0.1)
        await browser.async_cancel()
    ours = [f for f in finds if f.fingerprint == fingerprint(node.node_id)]
    assert ours == [Found(fingerprint(node.node_id), (LOOPBACK,), port)]
    # On the wire, the TXT holds only the fingerprint, the version and the port.
    assert info.properties == {
        b"id": fingerprint(node.node_id).encode(),
        b"v": b"1",
        b"port": str(port).encode(),
    }
    assert info.port == port
    assert events[0] is ServiceStateChange.Added
    assert events[-1] is ServiceStateChange.Removed


async def test_discover_a_real_node_over_loopback_mdns(nodes) -> None:
    bob, bob_id = nodes["bob"]
    alice_id = nodes["alice"][1]
    port = int(bob.url.rsplit(":", 1)[1])
    with (
        announce(bob_id.node_id, port, LOOPBACK) as bobs,
        announce(alice_id.node_id, free_port(), LOOPBACK) as ours,
    ):
        assert bobs is not None and ours is not None
        assert await asyncio.to_thread(bobs.wait, 10)
        found, problems = await run_discover(
            mdns=True, interface=LOOPBACK, timeout=BROWSE_SECONDS, self_id=alice_id.node_id
        )
    mine = [d for d in found if d.node_id in (bob_id.node_id, alice_id.node_id)]
    assert [(d.name, d.via, d.urls[0]) for d in mine] == [("bob", "mdns", bob.url)]
    # Other tests may announce on loopback at the same time; none of ours went wrong.
    assert not [p for p in problems if bob.url in p], problems


def test_announce_failure_only_warns(caplog) -> None:
    ran = []
    with caplog.at_level(logging.WARNING, logger="federation.discovery"):
        for interface in ("192.0.2.55", "no-such-if0", "::1"):
            with announce(NODE_ID, 8787, interface) as announcement:
                ran.append(announcement)
    assert ran == [None, None, None]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert all("mDNS announcement not started" in w for w in warnings)
    assert "only IPv4" in warnings[2]


def test_interface_by_address_or_name() -> None:
    assert discovery.interface_address("127.0.0.1") == "127.0.0.1"
    assert discovery.interface_address("lo") == "127.0.0.1"
    with pytest.raises(ValueError, match="only IPv4"):
        discovery.interface_address("::1")
    with pytest.raises(ValueError, match="no such"):
        discovery.interface_address("no-such-if0")


def test_exceptions_in_the_block_still_propagate_and_unregister() -> None:
    with (
        pytest.raises(RuntimeError, match="server crashed"),
        announce(NODE_ID, 8787, LOOPBACK) as announcement,
    ):
        assert announcement is not None
        raise RuntimeError("server crashed")
    assert announcement.zeroconf.done


# --- mDNS between network namespaces --------------------------------------------------------

ANNOUNCER = """
import sys, threading
import nacl.signing, msgspec, uvicorn
from federation.descriptors import make_descriptor
from federation.discovery import announce
from federation.identity import NodeIdentity

seed, name, port, interface = sys.argv[1:5]
identity = NodeIdentity(nacl.signing.SigningKey(bytes.fromhex(seed)))
body = msgspec.json.encode(make_descriptor(identity, name, ["https://" + name + ".example"]))

async def app(scope, receive, send):
    found = scope["path"] == "/federation/node"
    await send({"type": "http.response.start", "status": 200 if found else 404,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body if found else b""})

# As `aihub serve` does: announce from the main thread, then run the server inside.
announcement = None
try:
    with announce(identity.node_id, int(port), interface or None) as announcement:
        def ready():
            print("ready" if announcement and announcement.wait(45) else "failed", flush=True)
        threading.Thread(target=ready, daemon=True).start()
        uvicorn.run(app, host="0.0.0.0", port=int(port), log_level="warning", lifespan="off")
finally:
    done = announcement is not None and announcement.zeroconf.done
    print("unregistered" if done else "still registered", flush=True)
"""

BROWSER = """
import asyncio, json, sys
import httpx, nacl.signing
from federation.discovery import announce, browse_mdns, discover
from federation.identity import NodeIdentity

seed, interface, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
identity = NodeIdentity(nacl.signing.SigningKey(bytes.fromhex(seed)))

async def main():
    problems = []
    async with httpx.AsyncClient() as client:
        return await asyncio.gather(
            browse_mdns(seconds, interface),
            discover(client, mdns=True, interface=interface, timeout=seconds,
                     self_id=identity.node_id, on_problem=problems.append),
        ), problems

# The browsing node announces itself too: it hears itself, and discover leaves it out.
with announce(identity.node_id, 8787, interface) as announcement:
    assert announcement is not None and announcement.wait(10)
    (finds, nodes), problems = asyncio.run(main())
print(json.dumps({
    "finds": [[f.fingerprint, list(f.addresses), f.port] for f in finds],
    "nodes": [[d.node_id, d.name, list(d.urls), d.via] for d in nodes],
    "problems": problems,
}))
"""


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr.strip()}"


@pytest.fixture
def namespaces() -> Iterator[list[str]]:
    """ns1..ns3, each with `eth0` on 10.213.77.0/24, joined by a bridge in a fourth namespace;
    the host's own interfaces and routes are never touched. Removed afterwards, even on
    failure."""
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root (CI runs this as root)")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip`")
    tag = f"aihubt{os.getpid()}"
    bridge_ns, names = f"{tag}br", [f"{tag}n{i}" for i in (1, 2, 3)]
    created: list[str] = []
    try:
        for ns in (bridge_ns, *names):
            ip("netns", "add", ns)
            created.append(ns)
        ip("-n", bridge_ns, "link", "add", "br0", "type", "bridge")
        ip("-n", bridge_ns, "link", "set", "br0", "up")
        for number, ns in enumerate(names, start=1):
            port = f"p{number}"
            ip(
                "-n",
                ns,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                bridge_ns,
            )
            ip("-n", bridge_ns, "link", "set", port, "master", "br0")
            ip("-n", bridge_ns, "link", "set", port, "up")
            ip("-n", ns, "addr", "add", f"10.213.77.{number}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")
        yield names
    finally:
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def in_namespace(ns: str, script: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-c", script, *args]


def wait_for_line(process: subprocess.Popen[str], deadline: float) -> str:
    assert process.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.1)
        if ready:
            return process.stdout.readline().strip()
        if process.poll() is not None:
            break
    return f"no answer (exit {process.poll()})"


def test_mdns_between_three_network_namespaces(namespaces: list[str]) -> None:
    ns1, ns2, ns3 = namespaces
    seeds = [os.urandom(32) for _ in range(3)]
    ids = [NodeIdentity(nacl.signing.SigningKey(seed)) for seed in seeds]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # ns1 announces on every interface, ns2 on one named interface.
    announcers = [
        subprocess.Popen(
            in_namespace(ns, ANNOUNCER, seed.hex(), name, port, interface),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for ns, seed, name, port, interface in (
            (ns1, seeds[0], "one", "8801", ""),
            (ns2, seeds[1], "two", "8802", "eth0"),
        )
    ]
    try:
        # A bound, not a pace: each announcer answers as soon as it is registered, but on a
        # loaded 2-core machine starting Python with zeroconf and uvicorn took over 15 s.
        deadline = time.monotonic() + 60
        assert [wait_for_line(p, deadline) for p in announcers] == ["ready", "ready"]
        browse = subprocess.run(
            in_namespace(ns3, BROWSER, seeds[2].hex(), "10.213.77.3", "2"),
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert browse.returncode == 0, browse.stderr
        result = json.loads(browse.stdout)
    finally:
        for process in announcers:
            process.terminate()
        for process in announcers:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    # SIGTERM stopped uvicorn gracefully, then unwound the announcement (goodbye packets)
    # instead of killing the process outright.
    outputs = [p.communicate()[0].split() for p in announcers]
    assert outputs == [["unregistered"], ["unregistered"]], [p.stderr for p in announcers]
    assert [p.returncode for p in announcers] == [128 + 15, 128 + 15]

    assert sorted(result["finds"]) == sorted(
        [
            [fingerprint(ids[0].node_id), ["10.213.77.1"], 8801],
            [fingerprint(ids[1].node_id), ["10.213.77.2"], 8802],
            [fingerprint(ids[2].node_id), ["10.213.77.3"], 8787],
        ]
    )
    assert result["nodes"] == [
        [ids[0].node_id, "one", ["http://10.213.77.1:8801", "https://one.example"], "mdns"],
        [ids[1].node_id, "two", ["http://10.213.77.2:8802", "https://two.example"], "mdns"],
    ]
    assert result["problems"] == []


# --- the command ----------------------------------------------------------------------------


def discover_command() -> click.Group:
    peers = click.Group("peers")
    peers.add_command(peers_discover)
    return peers


def test_cli_lists_new_nodes_only(nodes, tmp_path: Path) -> None:
    alice_dir, alice_id = nodes["alice"]
    (bob, bob_id), (carol, carol_id) = nodes["bob"], nodes["carol"]
    marked_dir, marked_id = new_node(tmp_path, "[bold red]mallory[/]", "mallory")
    with run_node(marked_dir) as marked:
        seeds = [bob.url, carol.url, marked.url, f"{bob_id.node_id}@{carol.url}"]
        alice_dir.set_config("seeds = []", f"seeds = {json.dumps(seeds)}")

        async def make_carol_a_peer() -> None:
            store = await open_store(alice_dir.path / DATABASE_FILE)
            try:
                await store.peers.save_peer(peer_record(alice_id, carol_id, carol.url, "sk-carol"))
            finally:
                await store.close()

        asyncio.run(make_carol_a_peer())
        runner = CliRunner()
        home = {"AIHUB_HOME": None, "COLUMNS": "300"}
        args = ["discover", "--data-dir", str(alice_dir.path), "--no-mdns", "--timeout", "5"]
        as_json = runner.invoke(discover_command(), [*args, "--json"], env=home)
        as_table = runner.invoke(discover_command(), args, env=home)
    assert as_json.exit_code == 0, as_json.output
    listed = json.loads(as_json.stdout)
    assert [(n["name"], n["node_id"], n["via"]) for n in listed] == [
        ("[bold red]mallory[/]", marked_id.node_id, "seed"),
        ("bob", bob_id.node_id, "seed"),
    ]
    assert listed[1]["fingerprint"] == fingerprint(bob_id.node_id)
    assert listed[1]["urls"][0] == bob.url
    # Carol is a peer already (and was asked for peers: her node has no such route yet, or
    # answers; either way not listed), and Bob's pin at Carol's URL is refused with a warning.
    assert "pinned" in as_json.stderr
    assert as_table.exit_code == 0, as_table.output
    assert "[bold red]mallory[/]" in as_table.stdout  # printed literally, not as markup
    assert bob_id.node_id in as_table.stdout and "carol" not in as_table.stdout


def test_cli_needs_a_node(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        discover_command(),
        ["discover", "--data-dir", str(tmp_path / "none"), "--no-mdns"],
        env={"AIHUB_HOME": None},
    )
    assert result.exit_code == 1
    assert "aihub init" in " ".join(result.output.split())  # wrapped where the path is long
    assert not (tmp_path / "none" / IDENTITY_FILE).exists()


def test_aihub_serve_announces_itself_and_discover_finds_it(tmp_path: Path) -> None:
    """`aihub serve` with `mdns = true` announces the node; another node's `aihub peers
    discover` finds it over loopback mDNS and verifies its descriptor."""
    from node.cli.main import main
    from tests.conftest import wait_ready
    from tests.mocks.server import free_port

    served, served_identity = new_node(tmp_path, "lighthouse")
    other, _ = new_node(tmp_path, "sailor")
    port = free_port()
    for node in (served, other):
        node.set_config("mdns = false", "mdns = true")
        node.set_config('mdns_interface = ""', 'mdns_interface = "127.0.0.1"')
    served.set_config("public_urls = []", f'public_urls = ["http://127.0.0.1:{port}"]')
    command = [sys.executable, "-m", "node.cli", "serve", "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--data-dir", str(served.path)],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", process)  # type: ignore[arg-type]
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not found:
            result = CliRunner().invoke(
                main,
                ["peers", "discover", "--json", "--timeout", "2", "--data-dir", str(other.path)],
            )
            assert result.exit_code == 0, result.output
            found = [
                entry
                for entry in json.loads(result.stdout)
                if entry["node_id"] == served_identity.node_id
            ]
        assert found and found[0]["name"] == "lighthouse" and found[0]["via"] == "mdns"
    finally:
        process.terminate()
        process.wait(timeout=15)


async def test_a_lan_full_of_announcements_is_browsed_up_to_a_bound(monkeypatch) -> None:
    """Anyone on the LAN can announce as many services as it likes: a browse resolves (and
    holds in memory) a bounded number of them."""
    monkeypatch.setattr(discovery, "MAX_MDNS_SERVICES", 2, raising=False)
    flood = [NodeIdentity.generate() for _ in range(5)]
    with contextlib.ExitStack() as stack:
        for node in flood:
            announcement = stack.enter_context(announce(node.node_id, free_port(), LOOPBACK))
            assert announcement is not None
            assert await asyncio.to_thread(announcement.wait, 10)
        finds = await browse_mdns(BROWSE_SECONDS, LOOPBACK)
    theirs = {fingerprint(node.node_id) for node in flood}
    assert 1 <= len([f for f in finds if f.fingerprint in theirs]) <= 2


def test_cli_finding_nothing_says_where_it_looked_without_an_empty_table(tmp_path: Path) -> None:
    create_node(tmp_path / "alone", "alone")
    result = CliRunner().invoke(
        discover_command(),
        ["discover", "--data-dir", str(tmp_path / "alone"), "--no-mdns", "--timeout", "1"],
        env={"AIHUB_HOME": None, "COLUMNS": "300"},
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "No new nodes found (peer exchange)."
