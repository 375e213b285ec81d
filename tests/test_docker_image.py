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
(`init --if-missing`): the same identity, no second admin key."""

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

import pytest

from tests.nspawn import HOST_FILES, base_system

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="podman (rootful) and network namespaces need root"
)

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
NAME = f"aihub-test-{os.getpid()}"
TAG = f"localhost/{NAME}"
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
LIMITS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]


def _run(command: list[str], timeout: float = 120, **kwargs: Any) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    said = f"{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, f"{' '.join(command)}\nexited {done.returncode}:\n{said}"
    return done.stdout


def _import_base(folder: Path) -> None:
    """`make systemd-root`'s system as the image `{TAG}-base`, with the machine's registry
    certificates and pip settings (a registry's proxy may sign with a CA of its own)."""
    base = folder / "base"
    base.mkdir()
    # cp, not copytree: the system has device nodes (/dev/zero would be read for ever).
    _run(["cp", "-a", "--reflink=auto", f"{base_system()}/.", str(base)])
    for host_file in HOST_FILES:
        if os.path.isfile(host_file):
            shutil.copyfile(host_file, base / host_file.lstrip("/"))
    tarred = subprocess.Popen(["tar", "-C", str(base), "-c", "."], stdout=subprocess.PIPE)
    _run(["podman", "import", "-", f"{TAG}-base"], stdin=tarred.stdout, timeout=300)
    assert tarred.wait(timeout=60) == 0
    shutil.rmtree(base)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The built image's inspection."""
    _import_base(tmp_path_factory.mktemp("image"))
    try:
        _run(
            [
                *("podman", "build", "--format", "docker", "--isolation", "chroot"),
                *("--layers=false", "--network", "host", "--file", str(DOCKERFILE)),
                *("--build-arg", f"PYTHON_IMAGE={TAG}-base", "--tag", TAG, str(ROOT)),
            ],
            timeout=900,
        )
        yield json.loads(_run(["podman", "image", "inspect", TAG]))[0]
    finally:
        for command in (["rm", "--force", NAME], ["volume", "rm", "--force", NAME]):
            subprocess.run(["podman", *command], capture_output=True, check=False)
        subprocess.run(
            ["podman", "rmi", "--force", TAG, f"{TAG}-base"], capture_output=True, check=False
        )


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
        check = subprocess.run([*PODMAN, "healthcheck", "run", NAME], capture_output=True)
        if check.returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"never healthy:\n{_logs()}")


def _logs() -> str:
    done = subprocess.run(["podman", "logs", NAME], capture_output=True, text=True)
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
            *(*PODMAN, "run", "--detach", "--name", NAME, *LIMITS),
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
    uid = int(
        _run(
            [*PODMAN, "run", "--rm", *LIMITS, "--volume", f"{NAME}:/data", TAG, "id", "-u"]
        ).strip()
    )
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
