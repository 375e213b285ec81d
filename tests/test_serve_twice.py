"""A second `aihub serve` where a node already serves (node/cli/folder_lock.py): refused
before it touches anything. Before, a start on a served folder released the running node's
budget reservations under its requests in flight, replayed its live journal, emptied its
metrics and, failing to listen, forgot the address its invites carry."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from node.cli.folder_lock import LOCK_FILE
from node.peers.address import SERVED_FILE
from node.provision import create_node
from tests.conftest import NodeDir, serve_process
from tests.mocks.server import free_port
from tests.test_budgets import CAP, make_key, priced_echo, spend_of
from tests.test_cli import AIHUB, squash
from tests.test_federation import wait_for
from tests.test_multiprocess import chat


def _start(folder: Path, port: int) -> tuple[int, str, str]:
    """A second `aihub serve --workers 2`: its exit status, stdout and stderr (squashed). One
    that starts (the refusal broken) is stopped with its workers, in a session of its own,
    and reported as still running."""
    command = [str(AIHUB), "serve", "--port", str(port), "--workers", "2"]
    env = {k: v for k, v in os.environ.items() if k != "AIHUB_HOME"} | {"COLUMNS": "400"}
    process = subprocess.Popen(
        [*command, "--data-dir", str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        return -1, out, squash(err)
    return process.returncode, out, squash(err)


def test_a_second_start_on_a_served_folder_is_refused_and_changes_nothing(
    node_dir: NodeDir, tmp_path: Path
) -> None:
    priced_echo(node_dir)
    key, key_id = make_key(node_dir.path, name="small", budget_micros=CAP)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    scope = f"key:{key_id}"
    with serve_process(node_dir.path, port, tmp_path / "serve.log", "--workers", "2") as first:
        assert chat(url, key) == 200
        assert wait_for(lambda: spend_of(node_dir.path, scope)[0] > 0)  # the usage written
        held = spend_of(node_dir.path, scope)
        assert held[1] > 0  # the rest of the worker's lease of the budget
        counters = sorted((node_dir.path / "metrics").glob("*.db"))
        assert counters
        served = (node_dir.path / SERVED_FILE).read_bytes()
        for path in node_dir.path.iterdir():  # what a serving node made: private, as init's
            assert not path.is_file() or path.stat().st_mode & 0o777 == 0o600, path.name
        # On another port (nothing else would stop it) and on the node's own.
        for other_port in (free_port(), port):
            code, out, err = _start(node_dir.path, other_port)
            assert code == 1, (out, err)
            assert squash(f"a node is already serving {node_dir.path} (pid {first.pid})") in err
            assert "serving" not in out and "Traceback" not in err
        assert spend_of(node_dir.path, scope) == held
        assert sorted((node_dir.path / "metrics").glob("*.db")) == counters
        assert (node_dir.path / SERVED_FILE).read_bytes() == served
        assert "replayed" not in (tmp_path / "serve.log").read_text()
        assert chat(url, key) == 200
    # Stopped, the folder is free again: the lock is the process's, not the file's.
    with serve_process(node_dir.path, free_port(), tmp_path / "again.log", "--workers", "2"):
        assert (node_dir.path / LOCK_FILE).exists()


def test_a_start_on_a_port_in_use_stops_before_it_touches_its_folder(
    node_dir: NodeDir, tmp_path: Path
) -> None:
    other = tmp_path / "bob"
    create_node(other, "bob")
    port = free_port()
    with serve_process(node_dir.path, port, tmp_path / "serve.log", "--workers", "2"):
        code, out, err = _start(other, port)
    assert code == 1, (out, err)
    assert squash(f"cannot listen on 127.0.0.1:{port}: Address already in use") in err
    assert "serving" not in out
    assert not (other / "metrics").exists() and not (other / SERVED_FILE).exists()
