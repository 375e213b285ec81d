"""What a stranger (any key pair, any address) can make a node keep is bounded: join requests
without an invite (per source address and in all, for a while), and the audit events its
failed attempts write."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import httpx
import msgspec
import pytest

from federation.descriptors import make_descriptor
from federation.identity import NodeIdentity
from federation.printable import PrintableFormatter
from federation.transport import signed_headers
from node.gateway import auth
from node.gateway.auth import AUDIT_MAX_PER_PERIOD, AUDIT_QUIET_SECONDS
from node.gateway.keys import generate_key
from node.storage.records import AuditEvent
from tests.conftest import NodeDir, run_node
from tests.test_cli import run_aihub
from tests.test_fuzz import assert_openai_error

TOTAL, PER_SOURCE = 6, 2
DEADLINE = 60.0


def _ask_to_join(url: str, identity: NodeIdentity, source: str) -> httpx.Response:
    """What a node without an invite sends: its signed descriptor, signed as a request."""
    target = url + "/federation/join-request"
    body = msgspec.json.encode(make_descriptor(identity, "mallory", ["http://192.0.2.7:8787"]))
    headers = signed_headers(identity, "POST", target, body)
    # Each source address is its own client: loopback answers the whole of 127/8.
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=30) as client:
        return client.post(target, content=body, headers=headers)


def _pending(node_dir: NodeDir) -> list[object]:
    completed = run_aihub("peers", "pending", "--json", "--data-dir", str(node_dir.path))
    assert completed.returncode == 0, completed.stderr
    return msgspec.json.decode(completed.stdout)


def test_a_flood_of_join_requests_stays_bounded(node_dir: NodeDir) -> None:
    node_dir.set_config(
        "health_interval = 30",
        "health_interval = 30\n"
        f"max_join_requests = {TOTAL}\n"
        f"max_join_requests_per_source = {PER_SOURCE}\n"
        "join_request_ttl = 3600",
    )
    with run_node(node_dir) as node:
        first = NodeIdentity.generate()
        statuses: dict[int, int] = {}
        kept_from: dict[int, int] = {}
        for source in range(2, 12):
            for n in range(3):
                identity = first if (source, n) == (2, 0) else NodeIdentity.generate()
                answer = _ask_to_join(node.url, identity, f"127.0.0.{source}")
                statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
                if answer.status_code == 429:
                    error = assert_openai_error(answer)
                    assert error["code"] == "too_many_join_requests"
                    assert answer.headers["retry-after"].isdigit()
                else:
                    assert answer.status_code == 202, answer.text
                    kept_from[source] = kept_from.get(source, 0) + 1
        # Thirty strangers from ten addresses: six wait, the others were told 429.
        assert statuses == {202: TOTAL, 429: 30 - TOTAL}, statuses
        assert len(_pending(node_dir)) == TOTAL
        # A node that already waits may ask again (it is how it learns the answer).
        assert _ask_to_join(node.url, first, "127.0.0.2").status_code == 202
        # One address alone cannot take every place.
        assert max(kept_from.values()) == PER_SOURCE, kept_from
        # A legitimate node after the flood is refused while the places are full...
        honest = NodeIdentity.generate()
        assert _ask_to_join(node.url, honest, "127.0.0.99").status_code == 429
    # ... and let in once the flood's requests are older than the time a request may wait.
    node_dir.set_config("join_request_ttl = 3600", "join_request_ttl = 1")
    with run_node(node_dir) as node:
        end = time.monotonic() + DEADLINE
        while _ask_to_join(node.url, honest, "127.0.0.99").status_code != 202:
            assert time.monotonic() < end, "the flood's join requests never expired"
            time.sleep(0.2)
    assert _pending_ids(node_dir) == {honest.node_id}


def _pending_ids(node_dir: NodeDir) -> set[str]:
    return {row[0]["node_id"] for row in _pending(node_dir)}  # type: ignore[index]


def _unknown_key_events(client: httpx.Client) -> list[dict[str, object]]:
    answer = client.get("/admin/audit", params={"limit": 1000, "action": "auth.unknown_key"})
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def test_a_flood_of_made_up_keys_writes_few_audit_events(node_dir: NodeDir) -> None:
    """Each made-up key id was its own audit subject: one row per request, forever."""
    with run_node(node_dir) as node, node.client() as admin, httpx.Client(base_url=node.url) as c:
        for _ in range(300):
            made_up, _ = generate_key()
            answer = c.get("/v1/models", headers={"authorization": f"Bearer {made_up}"})
            assert answer.status_code == 401
        # One address, one event per quiet period: a handful at most, not 300.
        assert 1 <= len(_unknown_key_events(admin)) < 30


def test_security_events_per_period_are_capped_and_the_rest_counted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Many addresses (a botnet, an IPv6 prefix) each a subject of their own: at most
    AUDIT_MAX_PER_PERIOD events a period, then one event that counts the rest."""
    clock = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: clock[0])
    events: list[AuditEvent] = []
    # A data folder of its own: the cache maps its `keys.epoch` when it is made.
    cache = auth.KeyCache(b"s" * 32, None, tmp_path, events.append)  # type: ignore[arg-type]
    for n in range(5 * AUDIT_MAX_PER_PERIOD):
        cache.note("auth.unknown_key", "0123456789ab", f"2001:db8::{n:x}")
    assert len(events) == AUDIT_MAX_PER_PERIOD
    clock[0] += AUDIT_QUIET_SECONDS
    cache.note("auth.unknown_key", "0123456789ab", "2001:db8::ffff")
    summary = events[AUDIT_MAX_PER_PERIOD]
    assert summary.action == "audit.suppressed"
    assert summary.detail == {"events": 4 * AUDIT_MAX_PER_PERIOD}
    assert events[-1].ip == "2001:db8::ffff"


# A name that would colour the terminal, return the cursor to forge a line, start rich markup,
# reverse what follows (bidi override) and clear the screen (C1 CSI), if printed raw.
EVIL = "mallory\x1b[31m\r\n[red]x[/red]\u202eevil\x9b2J"
RAW = ("\x1b", "\r", "\u202e", "\x9b")


def _assert_escaped(output: str) -> None:
    for character in RAW:
        assert character not in output, (character, output)
    assert "mallory\\x1b[31m\\x0d\\x0a[red]x[/red]\\u202eevil\\x9b2J" in output, output


def _aihub(node_dir: NodeDir, *args: str) -> str:
    completed = run_aihub(*args, "--data-dir", str(node_dir.path))
    assert completed.returncode == 0, completed.stderr
    return completed.stdout + completed.stderr


def test_names_chosen_by_others_are_printed_escaped(node_dir: NodeDir) -> None:
    """A key name (a tenant's admin may choose it) and a stranger's node name, through the
    real CLI: control characters shown escaped, markup shown as typed."""
    _aihub(node_dir, "keys", "create", "--name", EVIL)
    _assert_escaped(_aihub(node_dir, "keys", "list"))
    mallory = NodeIdentity.generate()
    with run_node(node_dir) as node:
        body = msgspec.json.encode(make_descriptor(mallory, EVIL, ["http://192.0.2.7:8787"]))
        target = node.url + "/federation/join-request"
        headers = signed_headers(mallory, "POST", target, body)
        assert httpx.post(target, content=body, headers=headers).status_code == 202
    _assert_escaped(_aihub(node_dir, "peers", "pending"))
    _assert_escaped(_aihub(node_dir, "peers", "approve", mallory.node_id))
    _assert_escaped(_aihub(node_dir, "peers", "list"))


def test_log_lines_show_control_characters_escaped() -> None:
    record = logging.LogRecord(
        "aihub.peering", logging.INFO, __file__, 1, "peer %s unreachable", (EVIL,), None
    )
    line = PrintableFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    escaped = "mallory\\x1b[31m\\x0d\\x0a[red]x[/red]\\u202eevil\\x9b2J"
    assert line == f"INFO aihub.peering: peer {escaped} unreachable"
