"""One node of the demo network: its folder, port and the files `aihub network up` keeps in
it (the pid of its `aihub serve`, its log, its admin key)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from federation.identity import NodeIdentity
from node.config import IDENTITY_FILE

PID_FILE = "aihub.pid"
LOG_FILE = "aihub.log"
KEY_FILE = "admin.key"


class NetworkError(Exception):
    """The network could not be brought up (or down); the message says what and where."""


@dataclass
class Node:
    name: str
    path: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.path / PID_FILE

    @property
    def log_file(self) -> Path:
        return self.path / LOG_FILE

    @property
    def key_file(self) -> Path:
        return self.path / KEY_FILE

    def admin_key(self) -> str:
        try:
            return self.key_file.read_text().strip()
        except FileNotFoundError:
            raise NetworkError(
                f"{self.key_file} is missing: this network's {self.name} was not made by "
                f"`aihub network up`; remove {self.path.parent} to start afresh"
            ) from None

    def node_id(self) -> str:
        return NodeIdentity.load(self.path / IDENTITY_FILE).node_id

    def data_dir_args(self) -> list[str]:
        return ["--data-dir", str(self.path)]
