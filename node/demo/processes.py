"""The demo's nodes as processes: whether a pid is a live `aihub serve` of a given node,
stopping one, and whether a node answers on its port."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import suppress
from pathlib import Path

import httpx

from node.demo.nodes import Node


def alive(pid: int) -> bool:
    """Whether `pid` is a live process. A child of ours that has exited is reaped here (else
    it would linger as a zombie and look alive)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass  # not our child: ask the system
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def _command_line(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return None  # a Linux without this pid
    except OSError:
        return None
    try:  # macOS and the BSDs
        return subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, check=False
        ).stdout
    except OSError:
        return None


def serves(pid: int, path: Path) -> bool:
    """Whether `pid` is an `aihub serve` of the node in `path` (a pid file may outlive its
    process, and the pid be given to another)."""
    command = _command_line(pid)
    return bool(command) and " serve " in f" {command} " and str(path) in command  # type: ignore[operator]


def kill_group(pid: int) -> None:
    """SIGKILL the node's process group (it was started in a session of its own: any worker
    processes go with it)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_gone(pid: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def ready(node: Node) -> bool:
    try:
        return httpx.get(node.url + "/health/ready", timeout=1).is_success
    except httpx.HTTPError:
        return False


def listening(node: Node) -> bool:
    """Whether something answers HTTP on the node's port."""
    try:
        httpx.get(node.url, timeout=1)
    except httpx.HTTPError:
        return False
    return True
