"""deploy/Dockerfile built for real, and its image's command run. No Docker engine runs on these
machines, so podman builds the Dockerfile as written (`--isolation chroot`: each `RUN` in a
chroot), on a stand-in for `python:3.11-slim` that no registry here serves: Debian's
bookworm with its Python 3.11 (`make systemd-root`'s system), given as the Dockerfile's
`PYTHON_IMAGE`. The build installs the lock with its hashes checked, `pip check`s it and runs
`aihub --version`; a package the Dockerfile forgets to copy, or a lock that does not install,
fails here.

The image is then run the way a container would run it, minus the runtime (which needs
rlimits this sandbox refuses to set): its file system (`podman mount`), its user, environment,
working folder and command, in a network namespace of the test's own (the command serves on
0.0.0.0), and its health check's command from inside. The first start creates the node and
prints its admin key; a chat completion is answered; SIGTERM stops it with its last lines
written; the second start keeps the node it made (`init --if-missing`)."""

from __future__ import annotations

import hashlib
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
    os.geteuid() != 0, reason="podman, chroot and network namespaces need root"
)

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
TAG = f"localhost/aihub-test-{os.getpid()}"


def _run(command: list[str], timeout: float = 120, **kwargs: Any) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    said = f"{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, f"{' '.join(command)}\nexited {done.returncode}:\n{said}"
    return done.stdout


class Image:
    """The built image's file system, mounted, and what its config says to run."""

    def __init__(self, root: Path, inspected: dict[str, Any]) -> None:
        self.root = root
        self.config = inspected["Config"]
        self.health = inspected["Healthcheck"]  # beside the config in podman's inspect
        config = self.config
        passwd = (root / "etc" / "passwd").read_text().splitlines()
        user, _, group = str(config["User"]).partition(":")
        entry = next(line.split(":") for line in passwd if line.split(":")[0] == user)
        assert group == user and entry[2] != "0", config["User"]
        self.uid, self.gid = entry[2], entry[3]

    def command(self, namespace: str, argv: list[str], **env: str) -> list[str]:
        """`argv` as the image runs it: its user, environment and working folder, in the
        test's network namespace."""
        environment = [*self.config["Env"], *(f"{name}={value}" for name, value in env.items())]
        return [
            *("ip", "netns", "exec", namespace),
            *("chroot", f"--userspec={self.uid}:{self.gid}", str(self.root)),
            *("/usr/bin/env", "-i", *environment),
            *("sh", "-c", f'cd {self.config["WorkingDir"]} && exec "$@"', "sh", *argv),
        ]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    base = tmp_path_factory.mktemp("image") / "base"
    base.mkdir()
    # cp, not copytree: the system has device nodes (/dev/zero would be read for ever).
    _run(["cp", "-a", "--reflink=auto", f"{base_system()}/.", str(base)])
    for host_file in HOST_FILES:  # the registries' certificates and pip's settings
        if os.path.isfile(host_file):
            shutil.copyfile(host_file, base / host_file.lstrip("/"))
    tarred = subprocess.Popen(["tar", "-C", str(base), "-c", "."], stdout=subprocess.PIPE)
    _run(["podman", "import", "-", f"{TAG}-base"], stdin=tarred.stdout, timeout=300)
    assert tarred.wait(timeout=60) == 0
    shutil.rmtree(base)
    mounts: list[Path] = []
    try:
        _run(
            [
                *(
                    "podman",
                    "build",
                    "--format",
                    "docker",
                    "--isolation",
                    "chroot",
                    "--layers=false",
                ),
                *("--network", "host", "--file", str(DOCKERFILE)),
                *("--build-arg", f"PYTHON_IMAGE={TAG}-base", "--tag", TAG, str(ROOT)),
            ],
            timeout=900,
        )
        inspected = json.loads(_run(["podman", "image", "inspect", TAG]))[0]
        _run(["podman", "create", "--name", TAG.rsplit("/", 1)[1], TAG])
        root = Path(_run(["podman", "mount", TAG.rsplit("/", 1)[1]]).strip())
        for inside, how in (("proc", ["-t", "proc", "proc"]), ("dev", ["--bind", "/dev"])):
            _run(["mount", *how, str(root / inside)])
            mounts.append(root / inside)
        yield Image(root, inspected)
    finally:
        for mounted in reversed(mounts):
            subprocess.run(["umount", "--lazy", str(mounted)], check=False)
        name = TAG.rsplit("/", 1)[1]
        subprocess.run(["podman", "rm", "--force", name], capture_output=True, check=False)
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


def _healthy(image: Image, namespace: str, server: subprocess.Popen[bytes], log: Path) -> None:
    """The image's own health check, from inside, until it passes."""
    check = image.health["Test"]
    assert check[0] == "CMD", check
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert server.poll() is None, log.read_text(errors="replace")
        if subprocess.run(image.command(namespace, check[1:]), capture_output=True).returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"never healthy:\n{log.read_text(errors='replace')}")


def _start(image: Image, namespace: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            image.command(namespace, image.config["Cmd"], AIHUB_NAME="imaged"),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _stop(server: subprocess.Popen[bytes], log: Path) -> str:
    server.terminate()
    server.wait(timeout=30)
    return log.read_text(errors="replace")


CHAT = """
import sys, openai
client = openai.OpenAI(base_url="http://127.0.0.1:8787/v1", api_key=sys.argv[1], max_retries=0)
hi = [{"role": "user", "content": "Hello, image"}]
print(client.chat.completions.create(model="echo", messages=hi).choices[0].message.content)
"""


def test_the_image_builds_and_its_command_serves_and_keeps_its_node(
    image: Image, namespace: str, tmp_path: Path
) -> None:
    assert image.config["Env"].count("AIHUB_HOME=/data") == 1
    first = tmp_path / "first.log"
    server = _start(image, namespace, first)
    try:
        _healthy(image, namespace, server, first)
        key = re.search(r"sk-hub-[A-Za-z0-9_-]+", first.read_text(errors="replace"))
        assert key, first.read_text()
        # A client in the same namespace (the node serves there, and only there).
        said = _run(["ip", "netns", "exec", namespace, sys.executable, "-c", CHAT, key.group()])
        assert said.strip() == "echo: Hello, image"
    finally:
        text = _stop(server, first)
    assert "Finished server process" in text, text
    data = image.root / "data"
    owners = {(path.stat().st_uid, path.stat().st_gid) for path in [data, *data.rglob("*")]}
    assert owners == {(int(image.uid), int(image.gid))}, owners
    identity = hashlib.sha256((data / "identity.key").read_bytes()).hexdigest()

    second = tmp_path / "second.log"
    server = _start(image, namespace, second)
    try:
        _healthy(image, namespace, server, second)
    finally:
        text = _stop(server, second)
    assert "sk-hub-" not in text, text  # no new node, no new admin key
    assert hashlib.sha256((data / "identity.key").read_bytes()).hexdigest() == identity
