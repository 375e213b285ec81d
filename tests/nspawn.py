"""A Debian system booted under systemd-nspawn, for tests of what runs under systemd.

The base system is `make systemd-root`'s (debootstrap's minimal bookworm with systemd, Python
and sudo, kept in .cache/); each test boots a copy of its own. The container shares the
host's network (no `--private-network`), so what it serves on 127.0.0.1 is the host's
loopback and nothing else; it is not registered with machined (`--register=no`, none runs
here) and stays in the test's own cgroup (`--keep-unit`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / ".cache" / "systemd" / "bookworm"
# What the installs inside need of the host: its name servers and its certificates (a
# registry's proxy may sign with a CA of the machine's own), and pip's settings.
HOST_FILES = ("/etc/resolv.conf", "/etc/ssl/certs/ca-certificates.crt", "/etc/pip.conf")


def base_system() -> Path:
    """`make systemd-root`'s system, made when missing (a minute: debootstrap). One test
    process at a time: the suite's workers would otherwise debootstrap into one folder."""
    lock = ROOT / ".cache" / "systemd.lock"
    lock.parent.mkdir(exist_ok=True)
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        done = subprocess.run(
            ["make", "systemd-root"], cwd=ROOT, capture_output=True, text=True, timeout=900
        )
    assert done.returncode == 0, f"make systemd-root failed:\n{done.stdout}\n{done.stderr}"
    return BASE


def copy_system(base: Path, root: Path) -> None:
    """`base` copied into the folder `root`, with the host's `HOST_FILES`. cp, not copytree:
    the system has device nodes (copytree would read /dev/zero for ever)."""
    subprocess.run(["cp", "-a", "--reflink=auto", f"{base}/.", str(root)], check=True)
    for host_file in HOST_FILES:
        if os.path.isfile(host_file):
            shutil.copyfile(host_file, root / host_file.lstrip("/"))


class Container:
    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name
        self.process: subprocess.Popen[bytes] | None = None
        self.init_pid = 0

    @classmethod
    def copy_of(cls, base: Path, root: Path, name: str) -> Container:
        copy_system(base, root)
        return cls(root, name)

    def chroot(self, script: str, timeout: float = 600) -> str:
        """`script` run by sh as root in the system before it boots; its output."""
        return _checked(["chroot", str(self.root), "/bin/sh", "-ec", script], timeout)

    def boot(self, log: Path) -> None:
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--quiet",
                    "--directory",
                    str(self.root),
                    "--machine",
                    self.name,
                    "--boot",
                    "--register=no",
                    "--keep-unit",
                    "--console=read-only",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.init_pid = self._find_init(log)
        # `--wait`: until the boot's jobs are done, once systemctl can reach systemd at all
        # (it prints nothing before); "degraded" (a unit a container cannot run failed) is
        # booted too.
        state = self.run(
            "for _ in $(seq 600); do state=$(systemctl is-system-running --wait 2>/dev/null)"
            ' || true; [ -n "$state" ] && break; sleep 0.1; done; echo "$state"',
            timeout=120,
        ).strip()
        assert state in ("running", "degraded"), f"{state}: {log.read_text(errors='replace')}"

    def _find_init(self, log: Path) -> int:
        """The container's PID 1, as the host numbers it."""
        assert self.process is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, log.read_text(errors="replace")
            for pid in _descendants(self.process.pid):
                if _namespaced_pid(pid) == 1:
                    return pid
            time.sleep(0.1)
        raise AssertionError(f"no init in the container: {log.read_text(errors='replace')}")

    def run(self, script: str, timeout: float = 120) -> str:
        """`script` run by sh as root inside the booted system (all its namespaces)."""
        return _checked(self.command(script), timeout)

    def command(self, script: str) -> list[str]:
        return ["nsenter", "--target", str(self.init_pid), "--all", "/bin/sh", "-ec", script]

    def halt(self) -> None:
        """SIGTERM to nspawn halts the system (its services stopped as on a shutdown)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def _checked(command: list[str], timeout: float) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    said = f"{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, f"{command[-1]}\nexited {done.returncode}:\n{said}"
    return done.stdout


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                found.append(child)
                todo.append(child)
    return found


def _namespaced_pid(pid: int) -> int | None:
    """The innermost pid namespace's number for `pid` (its status' last NSpid)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    except OSError:
        return None
    return None
