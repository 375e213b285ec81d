"""deploy/aihub.service under a real systemd. docs/deploy.md's "Install with systemd" is run as
written (its two blocks, the checkout in `/path/to/aihub`) in a Debian system that
systemd-nspawn boots (tests/nspawn.py). The unit's hardening, workers and stop are then
checked the way an operator meets them: the node serves over loopback as the `aihub` user,
restarts, stops on SIGTERM with its books closed and its last lines in the journal, and its
config check refuses a broken config before the start; `systemd-analyze security` rates the
unit's exposure.

The one change to what the docs say: the config's port is a free one, not 8787, so that a
node on this machine is not in the way (the container shares the host's network)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.mocks.server import free_port
from tests.nspawn import Container, base_system

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="debootstrap, chroot and systemd-nspawn need root"
)

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "deploy.md"
CHECKOUT = "/src"
DATA = "/var/lib/aihub"
CONFIG = f"{DATA}/config.toml"
AS_AIHUB = f"sudo -u aihub /opt/aihub/bin/aihub --data-dir {DATA}"
NOT_COPIED = (".git", ".venv", ".cache", "__pycache__", "*.egg-info", "build", ".pytest_cache")


def install_blocks() -> tuple[str, str]:
    """The first two shell blocks of docs/deploy.md's "Install with systemd": the install and
    the service (a third shows the command line's use)."""
    text = DOCS.read_text()
    section = text.split("## Install with systemd\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(blocks) >= 2, section
    return blocks[0], blocks[1]


class Booted:
    def __init__(self, container: Container, url: str, key: str) -> None:
        self.container = container
        self.url = url
        self.key = key

    def run(self, script: str) -> str:
        return self.container.run(script)

    def show(self, prop: str) -> str:
        return self.run(f"systemctl show aihub --property {prop} --value").strip()

    def start(self) -> None:
        self.run("systemctl start aihub")
        self.wait_ready()

    def wait_ready(self) -> None:
        # The unit is "active" once the process runs; ready once the workers have started.
        self.run(
            "for _ in $(seq 600); do systemctl is-active --quiet aihub || exit 1; "
            f"/opt/aihub/bin/python -c \"import urllib.request as u; u.urlopen('{self.url}"
            "/health/ready', timeout=1)\" 2>/dev/null && exit 0; sleep 0.05; done; exit 1"
        )

    def journal(self, invocation: str) -> str:
        return self.run(f"journalctl --no-pager -o cat _SYSTEMD_INVOCATION_ID={invocation}")


@pytest.fixture(scope="module")
def booted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Booted]:
    folder = tmp_path_factory.mktemp("systemd")
    root = folder / "root"
    root.mkdir()
    container = Container.copy_of(base_system(), root, f"aihub-test-{os.getpid()}")
    shutil.copytree(ROOT, root / CHECKOUT.lstrip("/"), ignore=shutil.ignore_patterns(*NOT_COPIED))
    install, service = install_blocks()
    printed = container.chroot(install.replace("/path/to/aihub", CHECKOUT))
    key = re.search(r"sk-hub-[A-Za-z0-9_-]+", printed)
    assert key, printed
    port = free_port()
    config = root / CONFIG.lstrip("/")
    text = config.read_text()
    assert "\nport = 8787" in text
    config.write_text(text.replace("\nport = 8787", f"\nport = {port}", 1))
    try:
        container.boot(folder / "console.log")
        # The second block as written, but for following the journal (it would never end).
        steps = service.replace("journalctl -u aihub -f", "journalctl -u aihub --no-pager")
        container.run(f"cd {CHECKOUT}\n{steps}")
        node = Booted(container, f"http://127.0.0.1:{port}", key.group())
        node.wait_ready()
        yield node
    finally:
        container.halt()
        shutil.rmtree(root, ignore_errors=True)  # half a gigabyte a run


def test_the_node_serves_as_its_own_user_through_the_unit(booted: Booted) -> None:
    booted.start()
    client = openai.OpenAI(base_url=booted.url + "/v1", api_key=booted.key, max_retries=0)
    hi = [{"role": "user", "content": "Hello, hub"}]
    reply = client.chat.completions.create(model="echo", messages=hi)
    assert reply.choices[0].message.content == "echo: Hello, hub"
    assert booted.show("User") == "aihub"
    main = booted.show("MainPID")
    uid = booted.run(f"awk '/^Uid:/ {{print $2}}' /proc/{main}/status").strip()
    assert uid == booted.run("id -u aihub").strip() != "0"
    # Everything it wrote is in the data folder, and is its own.
    owners = booted.run(f"find {DATA} ! -user aihub")
    assert owners == "", owners


def test_a_stop_closes_the_books_and_its_last_lines_reach_the_journal(booted: Booted) -> None:
    booted.run("systemctl stop aihub")
    before = _requests(booted)  # read stopped: a running node's last batch may be 50 ms away
    booted.start()
    headers = {"authorization": f"Bearer {booted.key}"}
    body = {"model": "echo", "messages": [{"role": "user", "content": "counted"}]}
    for _ in range(3):
        answer = httpx.post(booted.url + "/v1/chat/completions", json=body, headers=headers)
        assert answer.status_code == 200, answer.text
    booted.run("systemctl restart aihub")
    booted.wait_ready()
    invocation = booted.show("InvocationID")
    answer = httpx.post(booted.url + "/v1/chat/completions", json=body, headers=headers)
    assert answer.status_code == 200, answer.text
    booted.run("systemctl stop aihub")
    assert booted.show("ActiveState") == "inactive"
    assert booted.show("Result") == "success"
    journal = booted.journal(invocation)
    started = journal.count("Started server process")
    assert started >= 1, journal
    assert journal.count("Application shutdown complete.") == started, journal
    assert journal.count("Finished server process") == started, journal
    # Every request is in the database, and nothing is left in the journal to replay.
    assert booted.run(f"ls {DATA}/journal") == ""
    assert _requests(booted) == before + 4


def test_a_broken_config_stops_the_start_with_a_message(booted: Booted) -> None:
    booted.run("systemctl stop aihub")
    config = booted.run(f"cat {CONFIG}")
    broken = config.replace("[server]", "[server]\nworkers = 'many'", 1)
    assert broken != config
    try:
        booted.run(f"cat > {CONFIG} <<'EOF'\n{broken}EOF")
        refused = subprocess.run(booted.container.command("systemctl start aihub"), timeout=120)
        assert refused.returncode != 0
        assert booted.show("Result") == "exit-code"
        invocation = booted.show("InvocationID")
        journal = booted.journal(invocation)
        assert "workers" in journal and "config.toml" in journal, journal
        assert "Started server process" not in journal, journal
    finally:
        booted.run(f"cat > {CONFIG} <<'EOF'\n{config}EOF")
    booted.start()


def test_the_units_exposure_is_low(booted: Booted) -> None:
    report = booted.run("systemd-analyze security aihub --no-pager")
    level = re.search(r"Overall exposure level for aihub\.service: ([\d.]+)", report)
    assert level, report
    assert float(level.group(1)) <= 2.0, report


def _requests(booted: Booted) -> int:
    """The requests in the node's books (`aihub usage`, read as the node's user)."""
    report = json.loads(booted.run(f"{AS_AIHUB} usage --json --since 1d"))
    return sum(row["requests"] for row in report["data"])
