"""`aihub network up` / `down` for real: three `aihub serve` processes on loopback, peered by
invites, one request at carol served by alice, the receipt both keep, balances on each side;
`up` again while running and after `down` reuses everything."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner, Result

from node.cli.main import main
from node.config import CONFIG_FILE, DATABASE_FILE, IDENTITY_FILE, load_config
from node.demo.network import DEMO_MODEL
from node.demo.nodes import KEY_FILE, PID_FILE

NODES = ("alice", "bob", "carol")


def free_base_port() -> int:
    """A port p such that p, p + 1 and p + 2 are all free on loopback."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base > 65530:
            continue
        sockets = []
        try:
            for port in range(base, base + 3):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no three consecutive free ports")


def aihub(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def ok(*args: str) -> str:
    result = aihub(*args)
    assert result.exit_code == 0, result.output
    return result.output


def data(root: Path, name: str) -> list[str]:
    return ["--data-dir", str(root / name)]


def receipts(root: Path, name: str) -> list[dict[str, Any]]:
    return msgspec.json.decode(ok("ledger", "export", "--format", "json", *data(root, name)))


def balances(root: Path, name: str) -> dict[str, dict[str, Any]]:
    rows = msgspec.json.decode(ok("ledger", "balance", "--json", *data(root, name)))
    return {row["name"]: row for row in rows}


def pid_of(root: Path, name: str) -> int:
    return int((root / name / PID_FILE).read_text())


def serving(pid: int) -> bool:
    """Whether `pid` is a live `aihub serve` (not a zombie, not a reused pid)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our exited child
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return b"serve" in command and state != "Z"


@pytest.fixture
def network(tmp_path: Path):  # type: ignore[no-untyped-def]
    root = tmp_path / "net"
    yield root, free_base_port()
    aihub("network", "down", "--dir", str(root))


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="checks processes through /proc")
def test_network_up_down_and_up_again(network: tuple[Path, int]) -> None:
    root, base = network
    up = ok("network", "up", "--dir", str(root), "--base-port", str(base))

    # What it printed: three new nodes, three joins, the answer, who served it, the receipt
    # and each side's balance.
    for name in NODES:
        assert f"Creating {name}" in up and f"Starting {name}" in up
    for joiner, issuer in (("bob", "alice"), ("carol", "alice"), ("alice", "carol")):
        assert f"{joiner} → {issuer}: joined" in up
    assert '200: "echo: Hello from carol\'s user"' in up
    assert f"served by   alice (carol lists {DEMO_MODEL} as owned by alice" in up
    assert f"deployment {DEMO_MODEL}@alice" in up
    assert "alice → carol  seq 1" in up and "identical on both sides" in up
    assert "at alice  with carol" in up and "(they owe us)" in up
    assert "at carol  with alice" in up and "(we owe them)" in up

    # The state behind it: each node on its own port and URL, running from its pid file.
    for index, name in enumerate(NODES):
        config = load_config(root / name)
        assert config.server.port == base + index
        assert config.public_urls() == [f"http://127.0.0.1:{base + index}"]
        assert serving(pid_of(root, name))
    assert [d.name for d in load_config(root / "alice").models].count(DEMO_MODEL) == 1
    assert DEMO_MODEL not in [d.name for d in load_config(root / "carol").models]

    # The receipt is on both sides: same request, seq and amount, signed and countersigned.
    (at_alice,) = [r for r in receipts(root, "alice") if r["model"] == DEMO_MODEL]
    (at_carol,) = receipts(root, "carol")
    assert at_alice == at_carol
    assert at_alice["seq"] == 1 and at_alice["amount"] > 0 and at_alice["csig"]
    amount = at_alice["amount"]
    # Balances are opposite: carol owes alice exactly that amount.
    alice_side, carol_side = balances(root, "alice")["carol"], balances(root, "carol")["alice"]
    assert alice_side["they_used"] == carol_side["we_used"] == amount
    assert alice_side["net"] == -carol_side["net"] == amount
    # Alice recorded the request she served; carol recorded the one she was asked.
    for name in ("alice", "carol"):
        usage = msgspec.json.decode(ok("usage", "--by", "model", "--json", *data(root, name)))
        assert [(g["group"], g["requests"]) for g in usage["data"]] == [(DEMO_MODEL, 1)]

    # `up` again while running: nothing is created, started or joined; one more request.
    pids = {name: pid_of(root, name) for name in NODES}
    again = msgspec.json.decode(
        ok("network", "up", "--dir", str(root), "--base-port", str(base), "--json")
    )
    assert [n["state"] for n in again["nodes"]] == ["already running"] * 3
    assert {n["name"]: n["pid"] for n in again["nodes"]} == pids
    assert {j["state"] for j in again["joins"]} == {"already joined"}
    assert again["receipt_provider"] == again["receipt_consumer"]
    assert again["receipt_provider"]["seq"] == 2
    assert again["balance_provider"]["net"] == -again["balance_consumer"]["net"] > amount
    for name in ("alice", "carol"):  # every signature and hash link checks out
        assert "2 receipts  ok" in ok("ledger", "verify", *data(root, name))

    # `down` stops every process and keeps the data.
    kept = {name: (root / name / KEY_FILE).read_text() for name in NODES}
    node_ids = {n["name"]: n["node_id"] for n in again["nodes"]}
    down = ok("network", "down", "--dir", str(root))
    for name in NODES:
        assert f"{name}: stopped (pid {pids[name]})" in down
        assert not serving(pids[name])
        assert not (root / name / PID_FILE).exists()
        for file in (CONFIG_FILE, DATABASE_FILE, IDENTITY_FILE, KEY_FILE):
            assert (root / name / file).is_file()
    assert "not running" in ok("network", "down", "--dir", str(root))

    # `up` after `down` reuses the folders: same identities, keys, peers and chain.
    third = msgspec.json.decode(ok("network", "up", "--dir", str(root), "--json"))
    assert [n["state"] for n in third["nodes"]] == ["started"] * 3
    assert {n["name"]: n["node_id"] for n in third["nodes"]} == node_ids
    assert {name: (root / name / KEY_FILE).read_text() for name in NODES} == kept
    assert {j["state"] for j in third["joins"]} == {"already joined"}
    assert third["receipt_provider"]["seq"] == 3
    assert third["receipt_provider"] == third["receipt_consumer"]
    assert len(receipts(root, "carol")) == 3
    assert third["balance_consumer"]["we_used"] == sum(r["amount"] for r in receipts(root, "carol"))


def test_down_of_an_empty_folder_and_a_taken_port(tmp_path: Path) -> None:
    root = tmp_path / "net"
    assert ok("network", "down", "--dir", str(root)).count("not running") == 3
    # Something else answers on alice's port: `up` refuses to start over it.
    from tests.mocks.openai_mock import OpenAIMock
    from tests.mocks.server import serve_app

    port = free_base_port()
    with serve_app(OpenAIMock(), port=port):
        result = aihub("network", "up", "--dir", str(root), "--base-port", str(port))
    assert result.exit_code == 1
    assert f"port {port} is taken" in result.output
    assert not (root / "alice" / PID_FILE).exists()
