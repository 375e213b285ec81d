"""What `aihub network up` and `down` report (printed by `node.demo.story`, or as JSON)."""

from __future__ import annotations

from typing import Any

import msgspec


class NodeState(msgspec.Struct):
    name: str
    url: str
    node_id: str
    data_dir: str
    pid: int
    state: str  # created and started | started | already running


class JoinState(msgspec.Struct):
    joiner: str
    issuer: str
    state: str  # joined | already joined


class Served(msgspec.Struct):
    status: int
    model: str
    asked: str  # the node the client asked
    key_file: str  # the file holding that node's admin key, used for the request
    content: str
    request_id: str
    cost_micros: int
    owner: str  # who the asked node lists as the model's owner (`/v1/models` owned_by)
    deployment: str  # the asked node's usage record: which deployment served it
    provider_usage: dict[str, Any]  # `aihub usage --by model --json` row of the model, at alice
    consumer_usage: dict[str, Any]  # the same at carol


class Report(msgspec.Struct):
    dir: str
    provider: str  # the node that serves the demo model
    consumer: str  # the node that was asked for it
    nodes: list[NodeState]
    joins: list[JoinState]
    request: Served
    # The receipt of that request as each side exports it (`aihub ledger export --format json`).
    receipt_provider: dict[str, Any]
    receipt_consumer: dict[str, Any]
    # Each side's row for the other (`aihub ledger balance --json`).
    balance_provider: dict[str, Any]
    balance_consumer: dict[str, Any]
    names: dict[str, str]  # node id -> name


class Stopped(msgspec.Struct):
    name: str
    pid: int | None
    state: str  # stopped | killed | not running | stale pid file
