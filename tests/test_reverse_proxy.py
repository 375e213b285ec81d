"""deploy/nginx.conf and deploy/Caddyfile for real: a node behind Debian's nginx or Caddy with
TLS, and a peer that joins it and routes to it through the proxy, as docs/deploy.md sets a
public node up.

Each config is the file in deploy/ with only what a machine's own values change: its ports on
loopback (not 80 and 443, no IPv6), its certificate (a test CA's, for 127.0.0.1, which the
peer trusts through `SSL_CERT_FILE`, as any private CA is trusted; for Caddy in place of the
ACME certificate it would get), where it keeps its files, and the node's port.
Through it: an invite names the https:// address, the join and the peer's signed requests
reach the node with the Host they were signed over (the signature covers `@authority`, so a
proxy that rewrote it would make every peer request fail its check), a stream's first event
arrives while the upstream still holds the rest (the upstream waits until the client has read
it: a buffering proxy would never deliver it, and the client's read would time out), a body
over the node's limit gets the node's own 413, and `/metrics` is not served."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import re
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.nginx import nginx_main, nginx_path
from federation.invites import parse_invite
from tests.conftest import RunningNode, serve_process
from tests.mocks.script import read_body
from tests.mocks.server import free_port, serve_app
from tests.test_federation import Peer, cli, invite, make_peer, model_owners, wait_for

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
CADDYFILE = ROOT / "deploy" / "Caddyfile"
NGINX = nginx_path() or "/usr/sbin/nginx"
CADDY = shutil.which("caddy") or "/usr/bin/caddy"


# --- the upstream: a stream that waits for its first event to be read ---------------------


def _chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    body = {"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [choice]}
    return b"data: " + json.dumps({**body, **extra}).encode() + b"\n\n"


USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


class HeldStream:
    """An OpenAI upstream whose streams send their first event, then wait until `release` is
    set (by the test, once its client has read that event through every hop)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = await read_body(receive)
        stream = json.loads(body).get("stream", False)
        kind = b"text/event-stream" if stream else b"application/json"
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", kind)]}
        )
        if not stream:
            answer = {
                "id": "c",
                "object": "chat.completion",
                "model": "m",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "whole"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": USAGE,
            }
            await send({"type": "http.response.body", "body": json.dumps(answer).encode()})
            return
        first = _chunk({"role": "assistant", "content": "first"})
        await send({"type": "http.response.body", "body": first, "more_body": True})
        released = await asyncio.to_thread(self.release.wait, 60)
        rest = _chunk({"content": " rest" if released else " late"}, "stop")
        rest += _chunk({}, None, choices=[], usage=USAGE) + b"data: [DONE]\n\n"
        await send({"type": "http.response.body", "body": rest})


# --- TLS: a CA of the test's own and a certificate for 127.0.0.1 -------------------------


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key), PEM files in `folder`."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aihub test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.pem", folder / "fullchain.pem", folder / "privkey.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


# --- nginx with deploy/nginx.conf ----------------------------------------------------------


def deployed_conf(node_port: int, http_port: int, tls_port: int, cert: Path, key: Path) -> str:
    """deploy/nginx.conf with this machine's ports and certificate, and nothing else changed."""
    text = NGINX_CONF.read_text()
    changes = [
        ("server 127.0.0.1:8787;", f"server 127.0.0.1:{node_port};"),
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("listen 443 ssl http2;", f"listen 127.0.0.1:{tls_port} ssl http2;"),
        ("/etc/letsencrypt/live/hub.example.com/fullchain.pem", str(cert)),
        ("/etc/letsencrypt/live/hub.example.com/privkey.pem", str(key)),
    ]
    for old, new in changes:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    # IPv6 listeners: loopback only here.
    return re.sub(r"\n\s*listen \[::\]:\d+[^;]*;", "", text)


def _start_nginx(
    folder: Path, node_port: int, http_port: int, tls_port: int
) -> subprocess.Popen[bytes]:
    conf = deployed_conf(
        node_port, http_port, tls_port, folder / "fullchain.pem", folder / "privkey.pem"
    )
    (folder / "aihub.conf").write_text(conf)
    main = nginx_main(folder, f"    include {folder}/aihub.conf;")
    command = [NGINX, "-p", str(folder), "-c", str(main), "-e", str(folder / "error.log")]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr  # the deploy file as nginx reads it
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def deployed_caddyfile(folder: Path, node_port: int, http_port: int, tls_port: int) -> str:
    """deploy/Caddyfile with this machine's ports, certificate and folders."""
    text = CADDYFILE.read_text()
    here = (
        "\tadmin off\n\tdefault_bind 127.0.0.1\n"
        f"\thttp_port {http_port}\n\thttps_port {tls_port}\n"
        f"\tstorage file_system {folder / 'data'}\n"
    )
    certificate = f"{folder / 'fullchain.pem'} {folder / 'privkey.pem'}"
    site = f"https://127.0.0.1:{tls_port} {{\n\ttls {certificate}\n"
    changes = [
        ("{\n\temail admin@example.com\n", "{\n\temail admin@example.com\n" + here),
        ("hub.example.com {\n", site),
        ("reverse_proxy 127.0.0.1:8787 {", f"reverse_proxy 127.0.0.1:{node_port} {{"),
        ("/var/log/caddy/aihub.log", str(folder / "aihub.log")),
    ]
    for old, new in changes:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def _start_caddy(
    folder: Path, node_port: int, http_port: int, tls_port: int
) -> subprocess.Popen[bytes]:
    (folder / "Caddyfile").write_text(deployed_caddyfile(folder, node_port, http_port, tls_port))
    env = {
        **os.environ,
        "HOME": str(folder),
        "XDG_CONFIG_HOME": str(folder),
        "XDG_DATA_HOME": str(folder),
    }
    config = ["--config", str(folder / "Caddyfile"), "--adapter", "caddyfile"]
    checked = subprocess.run([CADDY, "validate", *config], capture_output=True, text=True, env=env)
    assert checked.returncode == 0, checked.stderr  # the deploy file as Caddy reads it
    return subprocess.Popen(
        [CADDY, "run", *config], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )


PROXIES = {"nginx": (NGINX, _start_nginx), "caddy": (CADDY, _start_caddy)}


def _wait_listening(url: str, process: subprocess.Popen[bytes], ca: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        try:
            httpx.get(
                url + "/health/live", verify=ssl.create_default_context(cafile=str(ca)), timeout=2
            )
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError("nginx never answered")


@pytest.mark.parametrize("name", sorted(PROXIES))
def test_a_peer_joins_and_routes_through_the_proxy_with_tls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    binary, start = PROXIES[name]
    if not os.access(binary, os.X_OK):
        pytest.skip(f"{name} is not installed (`make proxies` installs Debian's)")
    folder = tmp_path / name
    folder.mkdir()
    http_port, tls_port = free_port(), free_port()
    ca, _, _ = _certificates(folder)
    public = f"https://127.0.0.1:{tls_port}"
    upstream = HeldStream()
    with serve_app(upstream) as mock:
        alpha = make_peer(
            tmp_path,
            "alpha",
            f'[[models]]\nname = "held"\nprovider = "openai"\nmodel = "m"\nbase_url = "{mock}/v1"',
        )
        alpha.dir.set_config(
            f'public_urls = ["http://127.0.0.1:{alpha.port}"]', f'public_urls = ["{public}"]'
        )
        beta = make_peer(tmp_path, "beta")
        proxy = start(folder, alpha.port, http_port, tls_port)
        try:
            # The peer, its `join` and its requests trust the test's CA as a system would: in
            # the environment its processes start with (aiohttp reads it once, at import).
            monkeypatch.setenv("SSL_CERT_FILE", str(ca))
            with _served(alpha, tmp_path), _served(beta, tmp_path) as b:
                _wait_listening(public, proxy, ca)
                token = invite(alpha, "--models", "held")
                assert parse_invite(token).urls == [public]
                cli("join", token, "--data-dir", str(beta.path))
                assert wait_for(lambda: "held" in model_owners(b))
                _through_the_hop(b, upstream)
                _the_proxy_itself(public, http_port, ca, alpha.dir.key)
        finally:
            proxy.terminate()
            proxy.wait(timeout=30)


@contextmanager
def _served(peer: Peer, tmp_path: Path) -> Iterator[RunningNode]:
    """`aihub serve` in a process of its own, on the port its invites name."""
    peer.release()
    log = tmp_path / f"{peer.path.name}.log"
    with serve_process(peer.path, peer.port, log):
        yield RunningNode(peer.dir, f"http://127.0.0.1:{peer.port}")


def _through_the_hop(b: RunningNode, upstream: HeldStream) -> None:
    """beta → nginx (TLS) → alpha → the upstream: a complete answer, receipted, and a stream
    whose first event arrives while the upstream holds the rest."""
    body = {"model": "held", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    with b.client() as client:
        answer = client.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "whole"
        assert model_owners(b)["held"] == "alpha"
        stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with client.stream("POST", "/v1/chat/completions", json=stream, timeout=30) as events:
            assert events.status_code == 200
            lines = events.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert '"first"' in first, first
            upstream.release.set()  # only now may the upstream send the rest
            rest = [line for line in lines if line.startswith("data: ")]
        assert any('" rest"' in line for line in rest), rest
        assert rest[-1] == "data: [DONE]"


def _the_proxy_itself(public: str, http_port: int, ca: Path, key: str) -> None:
    auth = {"authorization": f"Bearer {key}"}
    with httpx.Client(
        base_url=public, verify=ssl.create_default_context(cafile=str(ca)), timeout=30
    ) as client:
        assert client.get("/metrics").status_code == 404  # nginx's, before the node
        # Over the node's 4 MiB and under nginx's 8: the node's own answer, in OpenAI's shape.
        big = {"model": "held", "messages": [{"role": "user", "content": "x" * (5 << 20)}]}
        refused = client.post("/v1/chat/completions", json=big, headers=auth)
        assert refused.status_code == 413
        assert refused.json()["error"]["type"], refused.text
    # Plain HTTP is sent to HTTPS.
    plain = httpx.get(f"http://127.0.0.1:{http_port}/v1/models", follow_redirects=False)
    assert plain.status_code in (301, 308), plain
    assert plain.headers["location"].startswith("https://127.0.0.1"), plain.headers
