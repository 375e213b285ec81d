"""deploy/Dockerfile built and run as a container. No Docker engine runs on these machines, so
podman builds the Dockerfile as written (`--isolation chroot`: each `RUN` in a chroot) on a
stand-in for `python:3.11-slim`, which no registry here serves: Debian bookworm with its
Python 3.11 (`make systemd-root`'s system), given as the Dockerfile's `PYTHON_IMAGE`. The
build installs the lock with its hashes checked, `pip check`s it and imports the app; a
package the Dockerfile forgets to copy, or a lock that does not install, fails here.

The image then runs as a container (podman with runc; this sandbox's crun refuses its hybrid
cgroups, and no runtime may raise rlimits here, so lower ones are asked for), in a network
namespace of the test's own (the command serves on 0.0.0.0) with a named volume on `/data`.
The first start creates the node and prints its admin key; the image's own health check
passes; a chat completion is answered; `podman stop` (SIGTERM) stops it with its last lines
written and its files the image user's; a second start keeps the node it made
(`init --if-missing`): the same identity, no second admin key.

compose.peers.yml then runs as it is (podman-compose, on the image built above as its
`aihub:local`): three peers and the mock upstream on one network, joined through seeds and the
invites they leave each other, and carol answers with alice's model as the file's header
says. Every podman here runs on a config, storage and networks of the test's own (in its
temporary folder), so nothing of the machine's podman is touched."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.nspawn import base_system, copy_system

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="podman (rootful) and network namespaces need root"
)

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
COMPOSE = ROOT / "compose.peers.yml"
NAME = f"aihub-test-{os.getpid()}"
TAG = f"localhost/{NAME}"
PODMAN = ["podman"]
# runc, as crun refuses this machine's hybrid cgroups; rlimits below the sandbox's own, which
# no runtime may raise; netavark, whose DNS lets compose services find each other by name.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
[network]
network_backend = "netavark"
network_config_dir = "{root}/networks"
"""
STORAGE_CONF = """\
[storage]
driver = "overlay"
graphroot = "{root}/storage"
runroot = "{root}/run"
"""
# Set by the `podman_home` fixture: the environment every podman command of this module runs in.
ENV: dict[str, str] = {}


def _run(command: list[str], timeout: float = 120, **kwargs: Any) -> str:
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=ENV or None, **kwargs
    )
    said = f"{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, f"{' '.join(command)}\nexited {done.returncode}:\n{said}"
    return done.stdout


@pytest.fixture(scope="module")
def podman_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A podman of the test's own: config, storage and networks in a temporary folder."""
    root = tmp_path_factory.mktemp("podman")
    (root / "containers.conf").write_text(CONTAINERS_CONF.format(root=root))
    (root / "storage.conf").write_text(STORAGE_CONF.format(root=root))
    ENV.update(
        os.environ,
        CONTAINERS_CONF=str(root / "containers.conf"),
        CONTAINERS_STORAGE_CONF=str(root / "storage.conf"),
    )
    try:
        yield root
    finally:
        # Everything in this storage is the test's own.
        for command in (
            ["rm", "--all", "--force"],
            ["volume", "prune", "--force"],
            ["network", "prune", "--force"],
            ["rmi", "--all", "--force"],
        ):
            subprocess.run(["podman", *command], env=ENV, capture_output=True)
        ENV.clear()
        shutil.rmtree(root, ignore_errors=True)


def _import_base(folder: Path) -> None:
    """`make systemd-root`'s system as the image `{TAG}-base`, with the machine's registry
    certificates and pip settings (a registry's proxy may sign with a CA of its own)."""
    base = folder / "base"
    base.mkdir()
    copy_system(base_system(), base)
    tarred = subprocess.Popen(["tar", "-C", str(base), "-c", "."], stdout=subprocess.PIPE)
    _run(["podman", "import", "-", f"{TAG}-base"], stdin=tarred.stdout, timeout=300)
    assert tarred.wait(timeout=60) == 0
    shutil.rmtree(base)


@pytest.fixture(scope="module")
def image(podman_home: Path) -> dict[str, Any]:
    """The built image's inspection; tagged `aihub:local` too, compose.peers.yml's name."""
    _import_base(podman_home)
    _run(
        [
            *("podman", "build", "--format", "docker", "--isolation", "chroot"),
            *("--layers=false", "--network", "host", "--file", str(DOCKERFILE)),
            *("--build-arg", f"PYTHON_IMAGE={TAG}-base", "--tag", TAG),
            *("--tag", "localhost/aihub:local", str(ROOT)),
        ],
        timeout=900,
    )
    return json.loads(_run(["podman", "image", "inspect", TAG]))[0]


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"aihub-image-{os.getpid()}"
    _run(["ip", "netns", "add", name])
    try:
        _run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"])
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def _healthy() -> None:
    """The image's own health check (`podman healthcheck run`), until it passes."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        state = _run([*PODMAN, "inspect", NAME, "--format", "{{.State.Status}}"]).strip()
        assert state == "running", _logs()
        check = subprocess.run([*PODMAN, "healthcheck", "run", NAME], capture_output=True, env=ENV)
        if check.returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"never healthy:\n{_logs()}")


def _logs() -> str:
    done = subprocess.run(["podman", "logs", NAME], capture_output=True, text=True, env=ENV)
    return done.stdout + done.stderr


def _data(volume: str, name: str) -> Path:
    mountpoint = _run(["podman", "volume", "inspect", volume, "--format", "{{.Mountpoint}}"])
    return Path(mountpoint.strip()) / name


CHAT = """
import sys, openai
client = openai.OpenAI(base_url="http://127.0.0.1:8787/v1", api_key=sys.argv[1], max_retries=0)
hi = [{"role": "user", "content": "Hello, image"}]
print(client.chat.completions.create(model="echo", messages=hi).choices[0].message.content)
"""


def test_the_image_runs_serves_stops_and_keeps_its_node(
    image: dict[str, Any], namespace: str
) -> None:
    config = image["Config"]
    assert config["User"] == "aihub:aihub" and "AIHUB_HOME=/data" in config["Env"]
    assert image["Healthcheck"]["Test"][0] == "CMD"  # kept by the docker format
    _run(
        [
            *(*PODMAN, "run", "--detach", "--name", NAME),
            *("--network", f"ns:/run/netns/{namespace}", "--volume", f"{NAME}:/data"),
            *("--env", "AIHUB_NAME=imaged", TAG),
        ]
    )
    _healthy()
    key = re.search(r"sk-hub-[A-Za-z0-9_-]+", _logs())
    assert key, _logs()
    # A client in the same namespace (the node serves there, and only there).
    said = _run(["ip", "netns", "exec", namespace, sys.executable, "-c", CHAT, key.group()])
    assert said.strip() == "echo: Hello, image"

    _run([*PODMAN, "stop", "--time", "30", NAME], timeout=60)
    logs = _logs()
    assert logs.count("Finished server process") == logs.count("Started server process") >= 1
    identity = _data(NAME, "identity.key")
    uid = int(_run([*PODMAN, "run", "--rm", "--volume", f"{NAME}:/data", TAG, "id", "-u"]).strip())
    folder = identity.parent
    owners = {path.stat().st_uid for path in [folder, *folder.rglob("*")]}
    assert owners == {uid} and uid != 0, owners
    first = identity.read_bytes()

    _run([*PODMAN, "start", NAME])
    _healthy()
    _run([*PODMAN, "stop", "--time", "30", NAME], timeout=60)
    logs = _logs()
    assert logs.count("Admin key") == 1, logs  # the second start made no new node
    assert identity.read_bytes() == first


def test_compose_peers_join_and_carol_answers_with_alices_model(image: dict[str, Any]) -> None:
    """compose.peers.yml as its header says to use it: `up`, then carol's admin key from its
    volume, then alice's `mock-gpt` asked of carol (on 127.0.0.1:8803)."""
    compose = ["podman-compose", "--project-name", NAME, "--file", str(COMPOSE)]
    _run([*compose, "up", "--detach"], timeout=300)
    try:
        key = ""
        headers: dict[str, str] = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # bob and carol join once alice has left invites
            done = subprocess.run(
                [*PODMAN, "exec", f"{NAME}_carol_1", "cat", "/data/admin.key"],
                capture_output=True,
                text=True,
                env=ENV,
            )
            key = done.stdout.strip()
            headers = {"authorization": f"Bearer {key}"}
            try:
                models = httpx.get("http://127.0.0.1:8803/v1/models", headers=headers, timeout=3)
                if models.status_code == 200 and "mock-gpt" in models.text:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError(_run([*compose, "logs"]))
        hello = {"model": "mock-gpt", "messages": [{"role": "user", "content": "Hello"}]}
        answer = httpx.post(
            "http://127.0.0.1:8803/v1/chat/completions", json=hello, headers=headers, timeout=30
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "mock: Hello"
        peers = _run([*PODMAN, "exec", f"{NAME}_carol_1", "aihub", "peers", "list", "--json"])
        assert "alice" in {peer["name"] for peer in json.loads(peers)}
    finally:
        subprocess.run([*compose, "down", "--volumes"], env=ENV, capture_output=True, timeout=120)
