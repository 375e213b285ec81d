"""`aihub keys|tenants|usage|audit`, run through click's CliRunner on a real data folder (and a
real node where requests must have happened), and `aihub serve` releasing stale reservations."""

from __future__ import annotations

import asyncio
import csv
import getpass
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

import node.cli.output
from federation.identity import NodeIdentity
from node.cli.main import main
from node.config import DATABASE_FILE, IDENTITY_FILE
from node.gateway.keys import HASH_PURPOSE, hashes_match
from node.gateway.policy import period_start
from node.provision import create_node
from node.storage import open_store
from node.storage.records import Charge, Hold, KeyRecord, UsageRecord
from node.units import money
from tests.conftest import NodeDir, run_node, wait_ready
from tests.mocks.server import free_port

KEY_RE = re.compile(r"sk-hub-[0-9a-f]{12}_[A-Za-z0-9_-]{43}")
CSV_HEADER = "group,requests,errors,tokens_in,tokens_out,cost_micros,unbilled_micros,clamped"
# The command from the issue, word for word (as a shell would pass it).
ISSUE_COMMAND = [
    *("keys", "create", "--name", "ci-bot", "--models", "gpt-4o*,llama3", "--budget", "20"),
    *("--period", "monthly", "--rpm", "60", "--tpm", "100000", "--expires", "30d"),
]
HELLO = [{"role": "user", "content": "hello there"}]
USER = f"cli:{getpass.getuser()}"


def squash(text: str) -> str:
    """Rich wraps at the console's width: compare text without any whitespace."""
    return "".join(text.split())


def invoke(folder: Path, *args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--data-dir", str(folder)], env={"AIHUB_HOME": None})


def ok(folder: Path, *args: str) -> str:
    result = invoke(folder, *args)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result.output


def as_json(folder: Path, *args: str) -> Any:
    return json.loads(ok(folder, *args, "--json"))


def stored_keys(folder: Path) -> list[KeyRecord]:
    async def read() -> list[KeyRecord]:
        store = await open_store(folder / DATABASE_FILE)
        try:
            return await store.keys.keys()
        finally:
            await store.close()

    return asyncio.run(read())


def stored(folder: Path, key_id: str) -> KeyRecord:
    return next(record for record in stored_keys(folder) if record.id == key_id)


def hash_secret(folder: Path) -> bytes:
    return NodeIdentity.load(folder / IDENTITY_FILE).derive_secret(HASH_PURPOSE)


@pytest.fixture
def node_dir(tmp_path: Path) -> NodeDir:
    _, key = create_node(tmp_path / "node", "cli-test")
    return NodeDir(tmp_path / "node", key)


@pytest.fixture
def folder(node_dir: NodeDir) -> Path:
    return node_dir.path


@pytest.fixture
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    """A console wide enough that no table cell is folded over two lines (`_width`, which the
    `width` setter sets: monkeypatch then restores exactly what was there, usually None)."""
    monkeypatch.setattr(node.cli.output.console, "_width", 300)
    monkeypatch.setattr(node.cli.output.errors, "_width", 300)


def create(folder: Path, *args: str) -> tuple[str, dict[str, Any]]:
    created = as_json(folder, "keys", "create", *args)
    return created["key"], created["record"]


# --- keys -----------------------------------------------------------------------------------


def test_the_issue_command_creates_a_key_shown_once(folder):
    started = int(time.time())
    output = ok(folder, *ISSUE_COMMAND)
    [key] = KEY_RE.findall(output)
    assert "shown once" in output
    key_id = key[7:19]
    for text in (key_id, "ci-bot", "gpt-4o*, llama3", "$0 / $20 monthly", "60 / 100000"):
        assert text in output, text

    view = as_json(folder, "keys", "show", key_id)
    assert view["name"] == "ci-bot" and view["status"] == "active"
    assert view["limits"] == {
        "models": ["gpt-4o*", "llama3"],
        "budget_micros": 20_000_000,
        "rpm": 60,
        "tpm": 100_000,
    }
    assert started + 30 * 86400 <= view["expires_at"] <= int(time.time()) + 30 * 86400
    assert view["spend"]["cap_micros"] == 20_000_000 and view["spend"]["period"] == "monthly"
    assert as_json(folder, "keys", "show", key) == view  # by the key itself
    assert as_json(folder, "keys", "show", "ci-bot") == view  # by its name, while it is one's

    # Never shown again, and stored only as a keyed hash.
    secret = key.partition("_")[2]
    for args in (("keys", "list"), ("keys", "list", "--json"), ("keys", "show", key)):
        assert secret not in ok(folder, *args)
    assert key_id in ok(folder, "keys", "list")
    assert hashes_match(stored(folder, key_id).hash, hash_secret(folder), key)
    [event] = as_json(folder, "audit", "--action", "key.create")
    assert (event["actor"], event["target"], event["detail"]) == (USER, key_id, {"name": "ci-bot"})
    # A pattern that matches none of the node's models (echo, echo-embed) is said, and kept.
    output = squash(ok(folder, "keys", "create", "--name", "t", "--models", "gpt4o,echo*"))
    assert squash("--models pattern 'gpt4o' matches none of the models this node") in output
    assert "'echo*'matchesnone" not in output
    narrowed = squash(ok(folder, "keys", "update", "t", "--models", "echo-embed,gpt-5"))
    assert "'gpt-5'matchesnone" in narrowed and "'echo-embed'matchesnone" not in narrowed
    ok(folder, *ISSUE_COMMAND)  # a second key named ci-bot: the name no longer says which
    result = invoke(folder, "keys", "show", "ci-bot")
    assert result.exit_code == 1 and "2 keys are named 'ci-bot'" in result.stderr
    assert key_id in result.stderr and "give its id" in result.stderr


@pytest.mark.parametrize(
    ("currency", "shown_budget"), [("EUR", "€0 / €20 monthly"), ("CHF", "0 CHF / 20 CHF monthly")]
)
def test_amounts_are_shown_in_the_nodes_currency(folder, wide, currency, shown_budget):
    config = folder / "config.toml"
    text = config.read_text()
    assert 'currency = "USD"' in text
    config.write_text(text.replace('currency = "USD"', f'currency = "{currency}"'))
    output = ok(folder, "keys", "create", "--name", "eu", "--budget", "20")
    assert shown_budget in output and "$" not in output
    assert shown_budget in ok(folder, "keys", "list")
    assert "$" not in ok(folder, "usage")


def test_update_changes_what_is_given_and_none_removes_a_limit(folder):
    key, record = create(folder, *ISSUE_COMMAND[2:])
    view = as_json(
        folder,
        "keys",
        "update",
        record["id"],
        "--name",
        "ci-bot-2",
        "--budget",
        "none",
        "--rpm",
        "none",
        "--models",
        "none",
        "--tpm",
        "5",
        "--max-parallel",
        "3",
        "--expires",
        "never",
        "--ips",
        "10.0.0.0/8, ::1",
        "--meta",
        "team=ml",
        "--meta",
        "note=a=b",
    )
    assert view["name"] == "ci-bot-2"
    assert view["limits"] == {"tpm": 5, "max_parallel": 3}
    assert "expires_at" not in view and "spend" not in view
    assert view["allowed_ips"] == ["10.0.0.0/8", "::1"]
    assert view["metadata"] == {"team": "ml", "note": "a=b"}

    # By the key itself; what is not given stays as it was.
    view = as_json(folder, "keys", "update", key, "--ips", "none", "--budget", "0.5")
    assert "allowed_ips" not in view
    assert view["limits"] == {"budget_micros": 500_000, "tpm": 5, "max_parallel": 3}
    assert view["metadata"] == {"team": "ml", "note": "a=b"}
    view = as_json(folder, "keys", "update", key, "--period", "daily", "--expires", "12h")
    assert view["limits"]["budget_period"] == "daily"
    assert abs(view["expires_at"] - (time.time() + 12 * 3600)) < 60
    table = ok(folder, "keys", "update", key, "--tpm", "none")
    assert f"Updated key {record['id']}" in table and "$0 / $0.5 daily" in table
    updates = as_json(folder, "audit", "--action", "key.update")
    assert updates[0]["detail"]["fields"] == "tpm"
    assert len(updates) == 4


def test_rotate_keeps_the_old_key_for_the_grace_period_and_revoke_ends_it(folder):
    old, record = create(folder, "--name", "rotating", "--rpm", "10")
    key_id = record["id"]
    secret = hash_secret(folder)
    rotated = as_json(folder, "keys", "rotate", key_id, "--grace", "1h")
    new = rotated["key"]
    assert KEY_RE.fullmatch(new) and new[7:19] == key_id and new != old
    assert rotated["record"]["limits"] == record["limits"]
    assert abs(rotated["record"]["previous_key_valid_until"] - (time.time() + 3600)) < 60
    saved = stored(folder, key_id)
    assert hashes_match(saved.hash, secret, new)
    assert saved.prev_hash is not None and hashes_match(saved.prev_hash, secret, old)
    assert "old key valid until" in ok(folder, "keys", "show", new)

    output = ok(folder, "keys", "rotate", new, "--grace", "0")
    [newest] = KEY_RE.findall(output)
    saved = stored(folder, key_id)
    assert hashes_match(saved.hash, secret, newest)
    assert saved.prev_hash is None and saved.prev_valid_until is None
    assert "old key valid until" not in output

    assert f"Revoked key {key_id} (rotating)" in ok(folder, "keys", "revoke", newest)
    assert as_json(folder, "keys", "show", key_id)["status"] == "revoked"
    assert "revoked" in ok(folder, "keys", "show", key_id)
    assert key_id not in {k["id"] for k in as_json(folder, "keys", "list")}
    assert key_id in {k["id"] for k in as_json(folder, "keys", "list", "--all")}
    ok(folder, "keys", "revoke", key_id)  # again: nothing changes, no second event
    events = as_json(folder, "audit", "--action", "key.*")
    assert [e["action"] for e in events] == ["key.revoke", "key.rotate", "key.rotate", "key.create"]
    assert [e["detail"].get("grace_seconds") for e in events[1:3]] == [0, 3600]


# --- tenants --------------------------------------------------------------------------------


def test_tenants_create_list_show_update(folder, wide):
    tenant = as_json(
        folder,
        "tenants",
        "create",
        "--name",
        "acme",
        "--budget",
        "5",
        "--period",
        "daily",
        "--rpm",
        "10",
        "--tpm",
        "1000",
        "--max-parallel",
        "2",
        "--models",
        "echo*",
        "--meta",
        "owner=ops",
    )
    assert tenant["id"].startswith("tn_") and tenant["name"] == "acme"
    assert tenant["limits"] == {
        "models": ["echo*"],
        "budget_micros": 5_000_000,
        "budget_period": "daily",
        "rpm": 10,
        "tpm": 1000,
        "max_parallel": 2,
    }
    assert tenant["metadata"] == {"owner": "ops"} and tenant["keys"] == 0
    assert as_json(folder, "tenants", "list") == [tenant]
    assert as_json(folder, "tenants", "show", "acme") == tenant
    assert as_json(folder, "tenants", "show", tenant["id"]) == tenant
    table = squash(ok(folder, "tenants", "list"))
    for text in (tenant["id"], "acme", "echo*", "$0/$5daily", "10/1000"):
        assert squash(text) in table, text

    _, key = create(folder, "--name", "member", "--tenant", "acme")
    assert key["tenant_id"] == tenant["id"] and key["tenant"] == "acme"
    updated = as_json(
        folder,
        "tenants",
        "update",
        "acme",
        "--name",
        "acme-2",
        "--budget",
        "none",
        "--models",
        "none",
    )
    assert updated["name"] == "acme-2" and updated["keys"] == 1
    assert updated["limits"] == {
        "budget_period": "daily",
        "rpm": 10,
        "tpm": 1000,
        "max_parallel": 2,
    }
    assert as_json(folder, "keys", "show", key["id"])["tenant"] == "acme-2"
    output = ok(folder, "tenants", "update", tenant["id"], "--rpm", "none")
    assert f"Updated tenant {tenant['id']}" in output
    assert as_json(folder, "keys", "update", key["id"], "--tenant", "none").get("tenant") is None
    actions = [e["action"] for e in as_json(folder, "audit", "--action", "tenant.*")]
    assert actions == ["tenant.update", "tenant.update", "tenant.create"]


# --- usage and audit after real requests ----------------------------------------------------


def test_usage_reports_requests_served_by_a_running_node(node_dir, wide):
    folder = node_dir.path
    tenant = as_json(folder, "tenants", "create", "--name", "acme")
    key_a, record_a = create(folder, "--name", "alpha", "--tenant", "acme")
    key_b, record_b = create(folder, "--name", "beta")
    with run_node(node_dir) as running, httpx.Client(base_url=running.url) as client:

        def call(key: str, path: str, body: dict[str, Any]) -> httpx.Response:
            response = client.post(path, json=body, headers={"authorization": f"Bearer {key}"})
            assert response.status_code == 200, response.text
            return response

        chat = {"model": "echo", "messages": HELLO}
        served_a = [call(key_a, "/v1/chat/completions", chat) for _ in range(3)]
        served_b = [
            call(key_b, "/v1/chat/completions", chat),
            call(key_b, "/v1/embeddings", {"model": "echo-embed", "input": ["a b", "c"]}),
        ]
    # The node has stopped: everything it served is written.

    def row(responses: list[httpx.Response]) -> list[int]:
        usage = [r.json()["usage"] for r in responses]
        return [
            len(responses),
            0,
            sum(u["prompt_tokens"] for u in usage),
            sum(u.get("completion_tokens", 0) for u in usage),
            sum(int(r.headers["aihub-cost-micros"]) for r in responses),
            0,  # unbilled: echo's counts are its own
            0,  # clamped
        ]

    a, b = row(served_a), row(served_b)
    assert a[4] > b[4] > 0  # distinct costs: the order of the rows is certain
    expected_csv = (
        f"{CSV_HEADER}\n"
        + ",".join(map(str, [record_a["id"], *a]))
        + "\n"
        + ",".join(map(str, [record_b["id"], *b]))
        + "\n"
    )
    assert ok(folder, "usage", "--by", "key", "--csv") == expected_csv
    by_tenant = list(csv.reader(io.StringIO(ok(folder, "usage", "--by", "tenant", "--csv"))))
    assert by_tenant == [CSV_HEADER.split(","), [tenant["id"], *map(str, a)], ["", *map(str, b)]]

    report = as_json(folder, "usage", "--by", "model", "--since", "1h")
    assert report["object"] == "list" and report["by"] == "model"
    assert abs(report["since"] - (time.time() - 3600) * 1000) < 60_000
    models = {r["group"]: r for r in report["data"]}
    assert set(models) == {"echo", "echo-embed"}
    assert models["echo"]["requests"] == 4 and models["echo-embed"]["requests"] == 1
    assert models["echo-embed"]["tokens_in"] == served_b[1].json()["usage"]["prompt_tokens"]
    assert sum(r["cost_micros"] for r in report["data"]) == a[4] + b[4]

    table = squash(ok(folder, "usage", "--by", "key"))
    assert squash(f"{record_a['id']} (alpha)") in table
    assert squash(f"{record_b['id']} (beta)") in table
    total = ["total", "5", "0", str(a[2] + b[2]), str(a[3] + b[3]), money(a[4] + b[4])]
    assert "│".join(total) in table
    tenants = squash(ok(folder, "usage", "--by", "tenant"))
    assert f"{tenant['id']}(acme)" in tenants and "(none)" in tenants
    later = str(int(time.time()) + 120)
    assert as_json(folder, "usage", "--since", later)["data"] == []
    assert ok(folder, "usage", "--since", later, "--csv") == CSV_HEADER + "\n"


def test_audit_lists_admin_actions_newest_first_with_filters(folder, wide):
    key, record = create(folder, "--name", "audited")
    ok(folder, "keys", "update", key, "--rpm", "5")
    ok(folder, "tenants", "create", "--name", "ops")
    ok(folder, "keys", "revoke", record["id"])

    everything = as_json(folder, "audit")
    assert [(e["action"], e["target"]) for e in everything][:3] == [
        ("key.revoke", record["id"]),
        ("tenant.create", as_json(folder, "tenants", "show", "ops")["id"]),
        ("key.update", record["id"]),
    ]
    assert all(e["actor"] == USER for e in everything)
    keys_only = as_json(folder, "audit", "--action", "key.*")
    assert [e["action"] for e in keys_only] == ["key.revoke", "key.update", "key.create"]
    assert as_json(folder, "audit", "--action", "key.revoke") == keys_only[:1]
    assert as_json(folder, "audit", "--limit", "1") == everything[:1]
    assert as_json(folder, "audit", "--action", "auth.*") == []
    assert as_json(folder, "audit", "--since", str(int(time.time()) + 120)) == []

    table = ok(folder, "audit", "--action", "key.*")
    for text in ("key.revoke", "key.update", "key.create", USER, record["id"], "name=audited"):
        assert text in table, text


# --- errors ---------------------------------------------------------------------------------

USAGE_ERRORS = [
    # A malformed option value is a usage error (click's exit status 2), naming the option.
    (["keys", "create", "--name", "b", "--budget", "-5"], "--budget"),
    (["keys", "create", "--name", "b", "--budget", "1e30"], "--budget"),
    (["keys", "create", "--name", "b", "--budget", "1e999999999"], "--budget"),
    (["keys", "create", "--name", "b", "--budget", "twenty"], "--budget"),
    (["keys", "create", "--name", "b", "--budget", "0.0000001"], "--budget"),
    (["keys", "create", "--name", "b", "--budget", "NaN"], "--budget"),
    (["keys", "create", "--name", "b", "--rpm", "0"], "--rpm"),
    (["keys", "create", "--name", "b", "--rpm", "²"], "--rpm"),
    (["keys", "create", "--name", "b", "--rpm", "1.5"], "--rpm"),
    (["keys", "create", "--name", "b", "--rpm", "99999999999999999999"], "--rpm"),
    (["keys", "create", "--name", "b", "--tpm", "-1"], "--tpm"),
    (["keys", "create", "--name", "b", "--max-parallel", "0"], "--max-parallel"),
    (["keys", "create", "--name", "b", "--period", "yearly"], "--period"),
    (["keys", "create", "--name", "b", "--expires", "0"], "--expires"),
    (["keys", "create", "--name", "b", "--expires", "5y"], "--expires"),
    (["keys", "create", "--name", "b", "--expires", "99999999999999d"], "--expires"),
    (["keys", "create", "--name", "b", "--ips", "10.0.0.0/33"], "--ips"),
    (["keys", "create", "--name", "b", "--ips", "example.com"], "--ips"),
    (["keys", "create", "--name", "b", "--meta", "novalue"], "--meta"),
    (["keys", "create", "--name", "b", "--meta", "=x"], "--meta"),
    (["keys", "create", "--name", "b", "--models", ","], "--models"),
    (["keys", "update", "{id}", "--rpm", "-3"], "--rpm"),
    (["keys", "rotate", "{id}", "--grace", "soon"], "--grace"),
    (["tenants", "create", "--name", "t", "--budget", "-1"], "--budget"),
    (["tenants", "update", "acme", "--tpm", "x"], "--tpm"),
    (["usage", "--since", "nope"], "--since"),
    (["usage", "--since", "99999999999999999999"], "--since"),
    (["usage", "--since", "9999999999999d"], "--since"),
    (["usage", "--by", "user"], "--by"),
    (["audit", "--limit", "0"], "--limit"),
    (["audit", "--since", "-1d"], "--since"),
]


@pytest.fixture
def populated(folder: Path) -> dict[str, str]:
    _, record = create(folder, "--name", "existing", "--rpm", "7")
    ok(folder, "tenants", "create", "--name", "acme")
    return {"id": record["id"]}


@pytest.mark.parametrize(
    ("args", "option"), USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS]
)
def test_a_malformed_option_is_a_usage_error_naming_it(folder, populated, args, option):
    before = stored_keys(folder)
    result = invoke(folder, *(arg.format(**populated) for arg in args))
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert f"Invalid value for '{option}'" in result.output, result.output
    assert "Traceback" not in result.output
    assert stored_keys(folder) == before


REFUSALS = [
    # A well-formed command the node refuses: `error: …` and exit status 1.
    (["keys", "show", "nothing"], "no key 'nothing'"),
    (["keys", "show", "sk-hub-0123456789ab_" + "A" * 43], "no key '0123456789ab'"),
    (["keys", "revoke", "nothing"], "no key 'nothing'"),
    (["keys", "rotate", "nothing"], "no key 'nothing'"),
    (["keys", "update", "nothing", "--rpm", "5"], "no key 'nothing'"),
    (["keys", "update", "{id}"], "nothing to change"),
    (["keys", "update", "{id}", "--rpm", "5", "--tenant", "nope"], "no tenant 'nope'"),
    (["keys", "create", "--name", "b", "--tenant", "nope"], "no tenant 'nope'"),
    (["keys", "create", "--name", ""], "--name:"),
    (["keys", "create", "--name", "n" * 129], "--name:"),
    (["keys", "create", "--name", "b", "--meta", "k" * 129 + "=v"], "--meta:"),
    (["keys", "revoke", "{admin}"], "last admin key"),
    (["tenants", "create", "--name", "acme"], "a tenant named 'acme' exists"),
    (["tenants", "show", "nope"], "no tenant 'nope'"),
    (["tenants", "update", "nope", "--rpm", "1"], "no tenant 'nope'"),
    (["tenants", "update", "acme"], "nothing to change"),
]


@pytest.mark.parametrize(("args", "message"), REFUSALS, ids=[" ".join(a)[:60] for a, _ in REFUSALS])
def test_a_refused_command_fails_cleanly_and_changes_nothing(node_dir, populated, args, message):
    folder = node_dir.path
    targets = {**populated, "admin": node_dir.key}
    before = stored_keys(folder), as_json(folder, "tenants", "list")
    result = invoke(folder, *(arg.format(**targets) for arg in args))
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.stderr.startswith("error: "), result.output
    assert squash(message) in squash(result.stderr), result.stderr
    assert "Traceback" not in result.output and not KEY_RE.search(result.output)
    assert (stored_keys(folder), as_json(folder, "tenants", "list")) == before


def test_commands_need_a_node(tmp_path):
    for args in (["keys", "list"], ["keys", "create", "--name", "x"], ["usage"], ["audit"]):
        result = invoke(tmp_path / "nothing", *args)
        assert result.exit_code == 1, result.output
        assert "run`aihubinit`" in squash(result.stderr)


def test_a_revoked_key_cannot_be_changed_or_rotated(folder):
    key, record = create(folder, "--name", "gone")
    ok(folder, "keys", "revoke", key)
    for args in (("keys", "update", key, "--rpm", "1"), ("keys", "rotate", record["id"])):
        result = invoke(folder, *args)
        assert result.exit_code == 1 and f"key {record['id']} is revoked" in result.stderr
    assert stored(folder, record["id"]).limits.rpm is None


# --- user text ------------------------------------------------------------------------------

NAME = "[bold]x[/] :thumbs_up:"
META = "[red]hi :smile:"


def test_user_text_is_printed_literally(folder, wide):
    output = ok(folder, "keys", "create", "--name", NAME, "--meta", f"note={META}")
    [key] = KEY_RE.findall(output)
    assert NAME in output and META in output and "👍" not in output
    for args in (("keys", "show", key), ("keys", "list")):
        assert NAME in ok(folder, *args), args
    assert META in ok(folder, "keys", "show", key)
    ok(folder, "tenants", "create", "--name", "[i]acme:smile:", "--meta", f"owner={META}")
    assert "[i]acme:smile:" in ok(folder, "tenants", "list")
    shown = ok(folder, "tenants", "show", "[i]acme:smile:")
    assert "[i]acme:smile:" in shown and META in shown and "😄" not in shown
    assert f"name={NAME}" in ok(folder, "audit")
    assert f"Revoked key {key[7:19]} ({NAME})" in ok(folder, "keys", "revoke", key)

    result = invoke(folder, "keys", "show", "[bold]nope :smile:")
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("error: no key '[bold]nope :smile:' (")
    result = invoke(folder, "tenants", "show", "[/]")
    assert result.exit_code == 1 and "no tenant '[/]'" in result.stderr


# --- serve ----------------------------------------------------------------------------------


def test_serve_releases_reservations_left_by_a_crash(folder):
    scope, start = "key:abandoned", period_start("monthly", time.time())

    async def crash() -> None:
        store = await open_store(folder / DATABASE_FILE)
        try:
            await store.spend.open_periods([(scope, start, 10_000)])
            assert await store.spend.reserve(700, [(scope, start)])
            # One request settled (200 held, 150 spent); 500 stays held by requests that
            # never finished: the node stopped mid-request.
            record = UsageRecord(
                "req_settled", 0, "abandoned", None, "echo", None, None, "chat", False,
                1, 1, False, 150, 1, 200,
            )  # fmt: skip
            await store.usage.write_batch([Charge(record, [Hold(scope, start, 200)])], [])
        finally:
            await store.close()

    async def spend() -> tuple[int, int, int]:
        store = await open_store(folder / DATABASE_FILE)
        try:
            [row] = await store.spend.spend([(scope, start)])
            return row.cap, row.spent, row.reserved
        finally:
            await store.close()

    asyncio.run(crash())
    assert asyncio.run(spend()) == (10_000, 150, 500)

    port = free_port()
    aihub = Path(sys.executable).parent / "aihub"
    process = subprocess.Popen(
        [str(aihub), "serve", "--data-dir", str(folder), "--port", str(port)],
        env={k: v for k, v in os.environ.items() if k != "AIHUB_HOME"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", process)
        assert asyncio.run(spend()) == (10_000, 150, 0)
    finally:
        process.terminate()
        process.wait(timeout=15)


# --- a lost admin key ---------------------------------------------------------------------


def test_admin_key_reset_gives_a_running_node_a_new_admin_key(node_dir):
    """The README's recovery: `aihub admin-key reset` on the data folder. The new key works
    on the running node at once, the old one is refused at once, and the audit log says who
    reset it."""
    folder = node_dir.path
    with run_node(node_dir) as running, httpx.Client(base_url=running.url) as client:

        def status(key: str) -> int:
            return client.get("/admin/keys", headers={"authorization": f"Bearer {key}"}).status_code

        assert status(node_dir.key) == 200
        output = ok(folder, "admin-key", "reset")
        (new_key,) = KEY_RE.findall(output)
        assert "The old admin key no longer works" in output
        assert status(new_key) == 200
        assert status(node_dir.key) == 401
    events = as_json(folder, "audit", "--action", "admin_key.*")
    assert [(e["action"], e["actor"]) for e in events] == [("admin_key.reset", USER)]
    assert events[0]["target"] == new_key.split("_")[0].removeprefix("sk-hub-")


def test_admin_key_reset_refuses_an_id_that_is_no_admin_key(node_dir):
    folder = node_dir.path
    ok(folder, "admin-key", "reset")
    unknown = invoke(folder, "admin-key", "reset", "0123456789ab")
    assert unknown.exit_code == 1
    assert "namesnoactiveadminkey" in squash(unknown.output)
    # Hostile input: no traceback, no change.
    for junk in ("'; drop table keys; --", "\x1b[31mred", "a" * 5000):
        result = invoke(folder, "admin-key", "reset", junk)
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert "\x1b" not in result.output
    assert len([r for r in stored_keys(folder) if r.is_admin and r.revoked_at is None]) == 1
