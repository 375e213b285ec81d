"""The admin API (`/admin/*`) against a real node over real HTTP: keys, tenants, usage, audit,
every input validated, and changes that reach the very next request."""

from __future__ import annotations

import csv
import io
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from node.cli.main import main
from node.provision import create_node
from tests.conftest import NodeDir, RunningNode, run_node

KEY_RE = re.compile(r"sk-hub-[0-9a-f]{12}_[A-Za-z0-9_-]{43}")
HELLO = [{"role": "user", "content": "hello there"}]
RESET_RE = re.compile(r"^(\d+m\d+s|\d+s|\d+ms)$")
CSV_HEADER = "group,requests,errors,tokens_in,tokens_out,cost_micros,unbilled_micros,clamped"


# --- helpers --------------------------------------------------------------------------------


_clients: dict[str, httpx.Client] = {}


class Caller:
    """Requests to a node with one key (or none), on a client shared by the whole module:
    each new httpx client loads the CA bundle, which costs more than the requests here."""

    def __init__(self, node: RunningNode, key: str | None) -> None:
        if node.url not in _clients:
            _clients[node.url] = httpx.Client(base_url=node.url, timeout=30)
        self.client = _clients[node.url]
        self.auth = {"authorization": f"Bearer {key}"} if key else {}

    def __enter__(self) -> Caller:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self.auth, **kwargs.pop("headers", {})}
        return self.client.request(method, path, headers=headers, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("PATCH", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", path, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    for client in _clients.values():
        client.close()
    _clients.clear()


def admin(node: RunningNode) -> Caller:
    return Caller(node, node.key)


def as_key(node: RunningNode, key: str | None) -> Caller:
    return Caller(node, key)


def chat(node: RunningNode, key: str, model: str = "echo", **extra: Any) -> httpx.Response:
    with as_key(node, key) as client:
        return client.post(
            "/v1/chat/completions", json={"model": model, "messages": HELLO, **extra}
        )


def embed(node: RunningNode, key: str, model: str = "echo-embed") -> httpx.Response:
    with as_key(node, key) as client:
        return client.post("/v1/embeddings", json={"model": model, "input": "hello there"})


def create_key(node: RunningNode, **fields: Any) -> tuple[str, dict[str, Any]]:
    fields.setdefault("name", "k-" + secrets.token_hex(3))
    with admin(node) as client:
        response = client.post("/admin/keys", json=fields)
    assert response.status_code == 201, response.text
    body = response.json()
    return body["key"], body["record"]


def create_tenant(node: RunningNode, **fields: Any) -> dict[str, Any]:
    fields.setdefault("name", "t-" + secrets.token_hex(3))
    with admin(node) as client:
        response = client.post("/admin/tenants", json=fields)
    assert response.status_code == 201, response.text
    return response.json()


def patch_key(node: RunningNode, id_or_key: str, **fields: Any) -> dict[str, Any]:
    with admin(node) as client:
        response = client.patch(f"/admin/keys/{id_or_key}", json=fields)
    assert response.status_code == 200, response.text
    return response.json()


def openai_error(
    response: httpx.Response, status: int, *, type: str | None = None, code: Any = ...
) -> dict[str, Any]:
    """The response is OpenAI's error shape, exactly, with this status; its `error` object."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"], body
    error = body["error"]
    assert set(error) == {"message", "type", "code", "param"}, error
    assert isinstance(error["message"], str) and error["message"].strip()
    assert "Traceback" not in error["message"]
    if type is not None:
        assert error["type"] == type, error
    if code is not ...:
        assert error["code"] == code, error
    return error


def audit(node: RunningNode, **params: str) -> list[dict[str, Any]]:
    with admin(node) as client:
        response = client.get("/admin/audit", params={"limit": "1000", **params})
    assert response.status_code == 200, response.text
    return response.json()["data"]


def state(node: RunningNode) -> tuple[Any, Any, int]:
    """Everything an admin request can change: keys (revoked too), tenants, admin actions."""
    with admin(node) as client:
        keys = client.get("/admin/keys", params={"include_revoked": "true"}).json()
        tenants = client.get("/admin/tenants").json()
    changes = [e for e in audit(node) if e["action"].startswith(("key.", "tenant."))]
    return keys, tenants, len(changes)


def cli(node: RunningNode, *args: str) -> str:
    result = CliRunner().invoke(
        main, [*args, "--data-dir", str(node.dir.path)], env={"AIHUB_HOME": None}
    )
    assert result.exit_code == 0, result.output
    return result.output


def new_node(tmp_path: Path) -> NodeDir:
    _, key = create_node(tmp_path / "node", "admin-test")
    return NodeDir(tmp_path / "node", key)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    with run_node(new_node(tmp_path_factory.mktemp("admin"))) as running:
        yield running


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[RunningNode]:
    """A node of its own, for tests that count usage or audit events node-wide."""
    with run_node(new_node(tmp_path)) as running:
        yield running


# --- admin key only -------------------------------------------------------------------------

ADMIN_CALLS = [
    ("GET", "/admin/keys", None),
    ("POST", "/admin/keys", {"name": "sneaky"}),
    ("GET", "/admin/keys/0123456789ab", None),
    ("PATCH", "/admin/keys/0123456789ab", {"rpm": 1}),
    ("POST", "/admin/keys/0123456789ab/revoke", None),
    ("DELETE", "/admin/keys/0123456789ab", None),
    ("POST", "/admin/keys/0123456789ab/rotate", None),
    ("GET", "/admin/tenants", None),
    ("POST", "/admin/tenants", {"name": "sneaky"}),
    ("GET", "/admin/tenants/x", None),
    ("PATCH", "/admin/tenants/x", {"rpm": 1}),
    ("GET", "/admin/usage", None),
    ("GET", "/admin/audit", None),
]


def test_admin_endpoints_refuse_anyone_without_an_admin_key(node):
    key, record = create_key(node, name="not-an-admin")
    before = state(node)
    for method, path, body in ADMIN_CALLS:
        with as_key(node, None) as anonymous:
            error = openai_error(
                anonymous.request(method, path, json=body),
                401,
                type="authentication_error",
                code="invalid_api_key",
            )
        assert "Missing API key" in error["message"]
        with as_key(node, "sk-hub-0123456789ab_" + "A" * 43) as unknown:
            openai_error(unknown.request(method, path, json=body), 401, code="invalid_api_key")
        with as_key(node, key) as user:
            error = openai_error(
                user.request(method, path, json=body),
                403,
                type="permission_error",
                code="admin_key_required",
            )
        assert "admin key" in error["message"], (method, path)
    assert state(node) == before
    refused = audit(node, action="auth.not_admin")
    assert [e["target"] for e in refused][:1] == [record["id"]]
    assert refused[0]["ip"] == "127.0.0.1"


# --- keys -----------------------------------------------------------------------------------


def test_a_new_key_carries_every_field_and_is_shown_only_once(node):
    started = int(time.time())
    key, record = create_key(
        node,
        name="ci-bot",
        models=["ec?o", "gpt-4o*"],
        budget_micros=5_000_000,
        budget_period="weekly",
        rpm=50,
        tpm=100_000,
        max_parallel=4,
        expires_in=3600,
        allowed_ips=["127.0.0.0/8", "::1"],
        metadata={"team": "ml", "owner": "[bold]ada"},
    )
    assert KEY_RE.fullmatch(key)
    assert key.startswith(f"sk-hub-{record['id']}_")
    assert record["name"] == "ci-bot"
    assert record["status"] == "active" and record["is_admin"] is False
    assert record["limits"] == {
        "models": ["ec?o", "gpt-4o*"],
        "budget_micros": 5_000_000,
        "budget_period": "weekly",
        "rpm": 50,
        "tpm": 100_000,
        "max_parallel": 4,
    }
    assert started + 3600 <= record["expires_at"] <= int(time.time()) + 3600
    assert record["allowed_ips"] == ["127.0.0.0/8", "::1"]
    assert record["metadata"] == {"team": "ml", "owner": "[bold]ada"}
    assert record["spend"]["cap_micros"] == 5_000_000
    assert record["spend"]["period"] == "weekly"
    assert (record["spend"]["spent_micros"], record["spend"]["reserved_micros"]) == (0, 0)

    secret = key.partition("_")[2]
    with admin(node) as client:
        listed = client.get("/admin/keys")
        by_id = client.get(f"/admin/keys/{record['id']}")
        by_key = client.get(f"/admin/keys/{key}")
    for response in (listed, by_id, by_key):
        assert response.status_code == 200, response.text
        assert secret not in response.text
    assert by_id.json() == by_key.json() == record
    assert record in listed.json()["data"]
    assert secret not in str(audit(node))
    # Only a keyed hash is stored: the key is in no file of the data folder.
    for path in node.dir.path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path.name

    # The key works at once, for the models its globs allow and no other.
    answered = chat(node, key)
    assert answered.status_code == 200, answered.text
    assert answered.json()["choices"][0]["message"]["content"] == "echo: hello there"
    for model in ("echo-embed", "gpt-3.5-turbo", "Echo"):
        error = openai_error(chat(node, key, model), 403, type="permission_error")
        assert error["code"] == "model_not_allowed" and error["param"] == "model"
    openai_error(embed(node, key), 403, code="model_not_allowed")


def test_changed_limits_hold_from_the_next_request(node):
    key, record = create_key(node)
    key_id = record["id"]
    assert chat(node, key).status_code == 200

    patch_key(node, key_id, rpm=2)
    assert [chat(node, key).status_code for _ in range(2)] == [200, 200]
    openai_error(chat(node, key), 429, type="rate_limit_error", code="rate_limit_exceeded")
    patch_key(node, key_id, rpm=None)
    assert chat(node, key).status_code == 200

    patch_key(node, key_id, models=["llama3"])
    openai_error(chat(node, key), 403, code="model_not_allowed")
    view = patch_key(node, key_id, models=None)
    assert "models" not in view["limits"]
    assert chat(node, key).status_code == 200

    patch_key(node, key_id, budget_micros=0)
    openai_error(chat(node, key), 429, type="insufficient_quota", code="insufficient_quota")
    patch_key(node, key_id, budget_micros=None)
    assert chat(node, key).status_code == 200

    patch_key(node, key_id, allowed_ips=["10.0.0.0/8", "2001:db8::/32"])
    openai_error(chat(node, key), 403, type="permission_error", code="ip_not_allowed")
    patch_key(node, key_id, allowed_ips=["127.0.0.1"])
    assert chat(node, key).status_code == 200

    patch_key(node, key_id, expires_at=int(time.time()) - 1)
    error = openai_error(chat(node, key), 401, code="invalid_api_key")
    assert "expired" in error["message"]
    view = patch_key(node, key_id, expires_at=None, name="renamed")
    assert view["status"] == "active" and "expires_at" not in view
    assert view["name"] == "renamed"
    assert chat(node, key).status_code == 200


def test_revoked_keys_are_refused_on_the_very_next_request(node):
    key_a, record_a = create_key(node)
    key_b, record_b = create_key(node)
    assert chat(node, key_a).status_code == 200
    assert chat(node, key_b).status_code == 200
    with admin(node) as client:
        revoked = client.post(f"/admin/keys/{record_a['id']}/revoke")
        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["status"] == "revoked" and revoked.json()["revoked_at"]
        openai_error(chat(node, key_a), 401, code="invalid_api_key")

        deleted = client.delete(f"/admin/keys/{key_b}")  # by the key itself
        assert deleted.status_code == 200 and deleted.json()["id"] == record_b["id"]
        openai_error(chat(node, key_b), 401, code="invalid_api_key")

        # Revoking again changes nothing; a revoked key can be neither changed nor rotated.
        assert client.post(f"/admin/keys/{record_a['id']}/revoke").status_code == 200
        openai_error(client.patch(f"/admin/keys/{key_a}", json={"rpm": 1}), 409, code="conflict")
        openai_error(client.post(f"/admin/keys/{key_a}/rotate"), 409, code="conflict")
        openai_error(client.get("/admin/keys/0123456789ab"), 404, code="not_found")

        listed = {k["id"] for k in client.get("/admin/keys").json()["data"]}
        everything = client.get("/admin/keys?include_revoked=true").json()["data"]
    assert not {record_a["id"], record_b["id"]} & listed
    statuses = {k["id"]: k["status"] for k in everything}
    assert statuses[record_a["id"]] == statuses[record_b["id"]] == "revoked"
    revokes = [e["target"] for e in audit(node, action="key.revoke")]
    assert revokes.count(record_a["id"]) == 1 and revokes.count(record_b["id"]) == 1


def test_the_last_admin_key_cannot_be_revoked(node):
    admin_id = node.key[7:19]
    with admin(node) as client:
        error = openai_error(client.delete(f"/admin/keys/{node.key}"), 409, code="conflict")
        assert "last admin key" in error["message"]
        assert client.get("/admin/keys").status_code == 200
        assert client.get(f"/admin/keys/{admin_id}").json()["status"] == "active"


def test_rotation_keeps_the_old_key_for_its_grace_period_only(node):
    old, record = create_key(node, rpm=100)
    with admin(node) as client:
        rotated = client.post(f"/admin/keys/{old}/rotate", json={"grace_seconds": 3600})
        assert rotated.status_code == 200, rotated.text
        new = rotated.json()["key"]
        view = rotated.json()["record"]
        assert KEY_RE.fullmatch(new) and new != old
        assert view["id"] == record["id"] and view["limits"] == record["limits"]
        assert view["previous_key_valid_until"] >= int(time.time()) + 3590
        assert chat(node, old).status_code == 200
        assert chat(node, new).status_code == 200

        final = client.post(f"/admin/keys/{record['id']}/rotate", json={"grace_seconds": 0})
        assert final.status_code == 200, final.text
        newest = final.json()["key"]
        assert "previous_key_valid_until" not in final.json()["record"]
    assert chat(node, newest).status_code == 200
    openai_error(chat(node, new), 401, code="invalid_api_key")
    openai_error(chat(node, old), 401, code="invalid_api_key")
    rotations = [e for e in audit(node, action="key.rotate") if e["target"] == record["id"]]
    assert [e["detail"]["grace_seconds"] for e in rotations] == [0, 3600]


# --- tenants --------------------------------------------------------------------------------


def test_tenant_limits_hold_for_keys_that_have_none(node):
    tenant = create_tenant(node, rpm=2, metadata={"plan": "team"})
    assert tenant["id"].startswith("tn_") and tenant["keys"] == 0
    assert tenant["limits"] == {"rpm": 2}
    key, record = create_key(node, tenant=tenant["name"])
    assert record["tenant_id"] == tenant["id"] and record["tenant"] == tenant["name"]
    assert "rpm" not in record["limits"]

    assert [chat(node, key).status_code for _ in range(2)] == [200, 200]
    limited = chat(node, key)
    error = openai_error(limited, 429, code="rate_limit_exceeded")
    assert f"tenant:{tenant['id']}" in error["message"]
    assert limited.headers["x-ratelimit-limit-requests"] == "2"

    # A tenant with no budget left refuses a key with no budget of its own...
    broke = create_tenant(node, budget_micros=0, budget_period="daily")
    view = patch_key(node, key, tenant=broke["id"])
    assert view["tenant_id"] == broke["id"]
    openai_error(chat(node, key), 429, code="insufficient_quota")
    # ...and its model allowlist binds the key too.
    with admin(node) as client:
        updated = client.patch(
            f"/admin/tenants/{broke['name']}", json={"budget_micros": None, "models": ["gpt-4o*"]}
        )
        assert updated.status_code == 200, updated.text
        assert updated.json()["limits"] == {"models": ["gpt-4o*"], "budget_period": "daily"}
        openai_error(chat(node, key), 403, code="model_not_allowed")
        assert client.patch(f"/admin/tenants/{broke['id']}", json={"models": None}).is_success
        assert chat(node, key).status_code == 200

        shown = client.get(f"/admin/tenants/{broke['name']}").json()
        assert shown["keys"] == 1 and shown["id"] == broke["id"]
        assert client.get(f"/admin/tenants/{tenant['id']}").json()["keys"] == 0
        names = [t["name"] for t in client.get("/admin/tenants").json()["data"]]
        assert {tenant["name"], broke["name"]} <= set(names)
        openai_error(
            client.post("/admin/tenants", json={"name": tenant["name"]}), 409, code="conflict"
        )
        openai_error(client.get("/admin/tenants/nobody"), 404, code="not_found")

    # Out of the tenant, only the key's own (absent) limits apply.
    view = patch_key(node, key, tenant=None)
    assert "tenant_id" not in view
    assert [chat(node, key).status_code for _ in range(3)] == [200, 200, 200]


# --- rate limits ----------------------------------------------------------------------------


def test_rate_limits_answer_429_with_retry_after_and_openai_headers(node):
    key, _ = create_key(node, rpm=3)
    answers = [chat(node, key) for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert [r.headers["x-ratelimit-limit-requests"] for r in answers] == ["3"] * 3
    assert [r.headers["x-ratelimit-remaining-requests"] for r in answers] == ["2", "1", "0"]
    assert all(RESET_RE.match(r.headers["x-ratelimit-reset-requests"]) for r in answers)

    refused = chat(node, key)
    error = openai_error(refused, 429, type="rate_limit_error", code="rate_limit_exceeded")
    assert "3 requests per minute" in error["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 61
    assert refused.headers["x-ratelimit-limit-requests"] == "3"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert RESET_RE.match(refused.headers["x-ratelimit-reset-requests"])

    # Tokens per minute count the tokens requests actually used (10 for each of these).
    key, _ = create_key(node, tpm=15)
    first, second = chat(node, key), chat(node, key)
    assert first.json()["usage"]["total_tokens"] == 10
    assert (first.headers["x-ratelimit-remaining-tokens"], second.status_code) == ("15", 200)
    assert second.headers["x-ratelimit-remaining-tokens"] == "5"
    refused = chat(node, key)
    error = openai_error(refused, 429, code="rate_limit_exceeded")
    assert "15 tokens per minute" in error["message"]
    assert refused.headers["x-ratelimit-limit-tokens"] == "15"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert int(refused.headers["retry-after"]) >= 1


# --- usage ----------------------------------------------------------------------------------


def test_usage_groups_what_was_actually_served(fresh):
    node = fresh
    tenant = create_tenant(node, name="acme")
    key_a, record_a = create_key(node, tenant="acme")
    key_b, record_b = create_key(node, rpm=1)
    served = [chat(node, key_a), chat(node, key_a, max_tokens=1), embed(node, key_a)]
    served.append(chat(node, key_b))
    assert [r.status_code for r in served] == [200] * 4
    openai_error(chat(node, key_b), 429, code="rate_limit_exceeded")  # an error, charged 0

    def totals(responses: list[httpx.Response]) -> tuple[int, int, int]:
        tokens_in = sum(r.json()["usage"]["prompt_tokens"] for r in responses)
        tokens_out = sum(r.json()["usage"].get("completion_tokens", 0) for r in responses)
        cost = sum(int(r.headers["aihub-cost-micros"]) for r in responses)
        return tokens_in, tokens_out, cost

    a, b = totals(served[:3]), totals(served[3:])
    chats, embeds = totals([served[0], served[1], served[3]]), totals([served[2]])
    assert a[2] > 0 and b[2] > 0 and a[1] == 3 + 1
    expected = {
        # (… cost, unbilled, clamped): echo's counts are its own, never clamped or unbilled.
        "key": {record_a["id"]: [3, 0, *a, 0, 0], record_b["id"]: [2, 1, *b, 0, 0]},
        "tenant": {tenant["id"]: [3, 0, *a, 0, 0], None: [2, 1, *b, 0, 0]},
        "model": {"echo": [4, 1, *chats, 0, 0], "echo-embed": [1, 0, *embeds, 0, 0]},
    }
    columns = CSV_HEADER.split(",")
    with admin(node) as client:
        for by, groups in expected.items():
            report = client.get("/admin/usage", params={"by": by, "since": "1h"})
            assert report.status_code == 200, report.text
            body = report.json()
            assert body["object"] == "list" and body["by"] == by
            assert abs(body["since"] - (time.time() - 3600) * 1000) < 60_000
            rows = {row["group"]: [row[c] for c in columns[1:]] for row in body["data"]}
            assert rows == groups, by

            exported = client.get("/admin/usage", params={"by": by, "format": "csv"})
            assert exported.status_code == 200
            assert exported.headers["content-type"].startswith("text/csv")
            lines = exported.text.splitlines()
            assert lines[0] == CSV_HEADER
            parsed = list(csv.reader(io.StringIO(exported.text)))[1:]
            assert {row[0] or None: [int(v) for v in row[1:]] for row in parsed} == groups
            costs = [int(row[columns.index("cost_micros")]) for row in parsed]
            assert costs == sorted(costs, reverse=True)  # the costliest first

        # `since` cuts: a moment after the requests (ISO, unix seconds) shows nothing.
        later = int(time.time()) + 120
        for since in (str(later), time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(later))):
            report = client.get("/admin/usage", params={"since": since})
            assert report.status_code == 200 and report.json()["data"] == [], since
        empty = client.get("/admin/usage", params={"since": str(later), "format": "csv"})
        assert empty.text == CSV_HEADER + "\n"


# --- audit ----------------------------------------------------------------------------------


def test_audit_shows_admin_actions_and_security_events(fresh):
    node = fresh
    admin_id = node.key[7:19]
    actor = f"admin:{admin_id}"
    tenant = create_tenant(node, name="ops")
    key, record = create_key(node, name="auditee", tenant="ops")
    key_id = record["id"]
    patch_key(node, key_id, rpm=1)
    with admin(node) as client:
        assert client.patch("/admin/tenants/ops", json={"tpm": 1000}).is_success
        rotated = client.post(f"/admin/keys/{key_id}/rotate", json={"grace_seconds": 0}).json()
    key = rotated["key"]

    assert chat(node, key).status_code == 200
    openai_error(chat(node, key), 429, code="rate_limit_exceeded")  # limit.rate
    broke, broke_record = create_key(node, budget_micros=0)
    openai_error(chat(node, broke), 429, code="insufficient_quota")  # limit.budget
    fenced, fenced_record = create_key(node, allowed_ips=["192.0.2.0/24"])
    openai_error(chat(node, fenced), 403, code="ip_not_allowed")  # auth.ip_refused
    stranger = "sk-hub-0badc0ffee00_" + "x" * 43
    openai_error(chat(node, stranger), 401)  # auth.unknown_key
    expired, expired_record = create_key(node, expires_at=int(time.time()) - 60)
    openai_error(chat(node, expired), 401)  # auth.expired_key
    gone, gone_record = create_key(node)
    with admin(node) as client:
        assert client.delete(f"/admin/keys/{gone_record['id']}").is_success
    openai_error(chat(node, gone), 401)  # auth.revoked_key
    with as_key(node, broke) as user:
        openai_error(user.get("/admin/keys"), 403)  # auth.not_admin

    events = audit(node)
    changes = [
        (e["action"], e["target"]) for e in events if e["action"].startswith(("key.", "tenant."))
    ]
    assert changes[::-1] == [
        ("tenant.create", tenant["id"]),
        ("key.create", key_id),
        ("key.update", key_id),
        ("tenant.update", tenant["id"]),
        ("key.rotate", key_id),
        ("key.create", broke_record["id"]),
        ("key.create", fenced_record["id"]),
        ("key.create", expired_record["id"]),
        ("key.create", gone_record["id"]),
        ("key.revoke", gone_record["id"]),
    ]
    for event in events:
        if event["action"].startswith(("key.", "tenant.")):
            assert event["actor"] == actor, event
    created = next(e for e in events if e["action"] == "key.create" and e["target"] == key_id)
    assert created["detail"] == {"name": "auditee"}
    updated = next(e for e in events if e["action"] == "key.update")
    assert updated["detail"] == {"fields": "rpm"}

    # (A refused budget also raises a `budget.alert`, in the background: not counted here.)
    security = {
        (e["action"], e["target"]): e
        for e in events
        if e["actor"] is None and not e["action"].startswith("budget.")
    }
    assert set(security) == {
        ("limit.rate", key_id),
        ("limit.budget", broke_record["id"]),
        ("auth.ip_refused", fenced_record["id"]),
        ("auth.unknown_key", "0badc0ffee00"),
        ("auth.expired_key", expired_record["id"]),
        ("auth.revoked_key", gone_record["id"]),
        ("auth.not_admin", broke_record["id"]),
    }
    assert all(e["ip"] == "127.0.0.1" for e in security.values())
    assert "1 requests per minute" in security[("limit.rate", key_id)]["detail"]["reason"]
    assert "Budget exceeded" in security[("limit.budget", broke_record["id"])]["detail"]["reason"]

    # Filters: by action (with `*`), newest `limit`, and `since`.
    auth = audit(node, action="auth.*")
    assert {e["action"] for e in auth} == {
        "auth.ip_refused",
        "auth.unknown_key",
        "auth.expired_key",
        "auth.revoked_key",
        "auth.not_admin",
    }
    assert [e["target"] for e in audit(node, action="key.rotate")] == [key_id]
    newest = audit(node, action="key.*", limit="2")
    assert [(e["action"], e["target"]) for e in newest] == changes[:2]
    assert audit(node, since=str(int(time.time()) + 120)) == []


# --- bad input ------------------------------------------------------------------------------

KEY = "/admin/keys"
BAD_REQUESTS = [
    # (method, path, raw body or JSON, status, param)
    ("POST", KEY, {"name": "x", "colour": "red"}, 400, "colour"),
    ("POST", KEY, {"name": "x", "rpm": "60"}, 400, "rpm"),
    ("POST", KEY, {"name": "x", "rpm": 0}, 400, "rpm"),
    ("POST", KEY, {"name": "x", "tpm": 1.5}, 400, "tpm"),
    ("POST", KEY, {"name": "x", "max_parallel": -2}, 400, "max_parallel"),
    ("POST", KEY, {"name": "x", "budget_micros": -1}, 400, "budget_micros"),
    ("POST", KEY, {"name": "x", "budget_micros": 2**63}, 400, "budget_micros"),
    ("POST", KEY, {"name": "x", "budget_micros": 10**40}, 400, "budget_micros"),
    ("POST", KEY, b'{"name": "x", "tpm": 1e400}', 400, "tpm"),
    ("POST", KEY, {"name": "x", "rpm": 10**13}, 400, "rpm"),
    ("POST", KEY, {"name": "x", "budget_period": "yearly"}, 400, "budget_period"),
    ("POST", KEY, {"name": "x", "expires_at": 10**15}, 400, "expires_at"),
    ("POST", KEY, {"name": "x", "expires_in": 10**12}, 400, "expires_in"),
    ("POST", KEY, {"name": "x", "expires_in": 0}, 400, "expires_in"),
    ("POST", KEY, {"name": "x", "expires_in": 60, "expires_at": 4102444800}, 400, "expires_in"),
    ("POST", KEY, {"name": "x", "allowed_ips": ["10.0.0.0/33"]}, 400, "allowed_ips"),
    ("POST", KEY, {"name": "x", "allowed_ips": ["example.com"]}, 400, "allowed_ips"),
    ("POST", KEY, {"name": "x", "allowed_ips": "10.0.0.0/8"}, 400, "allowed_ips"),
    ("POST", KEY, {"name": "x", "models": "gpt-4o"}, 400, "models"),
    ("POST", KEY, {"name": "x", "models": ["echo", ""]}, 400, "models[1]"),
    ("POST", KEY, {"name": "x", "metadata": {"a": 1}}, 400, "metadata"),
    ("POST", KEY, {"name": "x", "metadata": ["a"]}, 400, "metadata"),
    ("POST", KEY, {"name": "x", "metadata": {"": "empty key"}}, 400, "metadata"),
    ("POST", KEY, {"name": ""}, 400, "name"),
    ("POST", KEY, {"name": "x" * 129}, 400, "name"),
    ("POST", KEY, {"name": None}, 400, "name"),
    ("POST", KEY, {"rpm": 5}, 400, "name"),
    ("POST", KEY, {"name": "x", "tenant": "no-such-tenant"}, 404, "tenant"),
    ("POST", KEY, {"name": "x", "is_admin": True}, 400, "is_admin"),
    ("POST", KEY, [{"name": "x"}], 400, None),
    ("POST", KEY, b'{"name": "x",', 400, None),
    ("POST", KEY, b"\xff\xfe{}", 400, None),
    ("POST", KEY, b"", 400, None),
    ("PATCH", "/admin/keys/{id}", {"rpm": 5, "allowed_ips": ["300.0.0.1"]}, 400, "allowed_ips"),
    ("PATCH", "/admin/keys/{id}", {"rpm": 5, "tenant": "no-such-tenant"}, 404, "tenant"),
    ("PATCH", "/admin/keys/{id}", {"rpm": 5, "budget_period": "hourly"}, 400, "budget_period"),
    ("PATCH", "/admin/keys/{id}", {"budget_micros": 5, "key": "sk-hub-x"}, 400, "key"),
    ("PATCH", "/admin/keys/0123456789ab", {"rpm": 5}, 404, None),
    ("POST", "/admin/keys/{id}/rotate", {"grace_seconds": -1}, 400, "grace_seconds"),
    ("POST", "/admin/keys/{id}/rotate", {"grace_seconds": 10**9}, 400, "grace_seconds"),
    ("POST", "/admin/keys/{id}/rotate", {"grace": 60}, 400, "grace"),
    ("POST", "/admin/keys/{id}/rotate", b"60", 400, None),
    ("POST", "/admin/keys/0123456789ab/revoke", None, 404, None),
    ("POST", "/admin/tenants", {"name": "t", "budget_micros": -5}, 400, "budget_micros"),
    ("POST", "/admin/tenants", {"name": "t", "rpm": True}, 400, "rpm"),
    ("POST", "/admin/tenants", {"nom": "t"}, 400, "nom"),
    ("POST", "/admin/tenants", {"name": "t", "allowed_ips": []}, 400, "allowed_ips"),
    ("POST", "/admin/tenants", {"name": "existing-tenant"}, 409, "name"),
    ("POST", "/admin/tenants", {"budget_micros": 5}, 400, "name"),
    ("PATCH", "/admin/tenants/existing-tenant", {"rpm": 5, "tpm": "x"}, 400, "tpm"),
    ("PATCH", "/admin/tenants/existing-tenant", {"name": "other-tenant"}, 409, "name"),
    ("PATCH", "/admin/tenants/no-such-tenant", {"rpm": 5}, 404, None),
    ("GET", "/admin/usage?since=yesterday", None, 400, "since"),
    ("GET", "/admin/usage?since=-1d", None, 400, "since"),
    ("GET", "/admin/usage?since=99999999999999999999", None, 400, "since"),
    ("GET", "/admin/usage?since=999999999999999d", None, 400, "since"),
    ("GET", "/admin/usage?since=%C2%B2", None, 400, "since"),
    ("GET", "/admin/usage?by=user", None, 400, "by"),
    ("GET", "/admin/usage?format=xml", None, 400, "format"),
    ("GET", "/admin/audit?limit=0", None, 400, "limit"),
    ("GET", "/admin/audit?limit=1001", None, 400, "limit"),
    ("GET", "/admin/audit?limit=ten", None, 400, "limit"),
    ("GET", "/admin/audit?limit=%C2%B2", None, 400, "limit"),
    ("GET", "/admin/audit?since=99999999999999999999", None, 400, "since"),
    ("GET", "/admin/keys?include_revoked=maybe", None, 400, "include_revoked"),
    ("GET", "/admin/keys/0123456789ab", None, 404, None),
    ("GET", "/admin/keys/" + "z" * 3000, None, 404, None),
]


@pytest.fixture(scope="module")
def targets(node: RunningNode) -> dict[str, str]:
    _, record = create_key(node, name="target", rpm=7)
    create_tenant(node, name="existing-tenant")
    create_tenant(node, name="other-tenant")
    return {"id": record["id"]}


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "param"),
    BAD_REQUESTS,
    ids=[f"{m} {p[:40]} {str(b)[:60]}" for m, p, b, _, _ in BAD_REQUESTS],
)
def test_bad_input_is_refused_by_name_and_changes_nothing(
    node, targets, method, path, body, status, param
):
    before = state(node)
    content = body if isinstance(body, bytes) else None
    with admin(node) as client:
        response = client.request(
            method,
            path.format(**targets),
            content=content,
            json=None if content is not None else body,
            headers={"content-type": "application/json"},
        )
    error = openai_error(response, status)
    assert error["type"] == "invalid_request_error"
    if param is None:
        assert error["param"] is None
    else:
        assert (error["param"] or "").startswith(param), error
    assert len(error["message"]) < 300, error
    assert state(node) == before


# --- the CLI and a running node -------------------------------------------------------------


def test_changes_made_with_the_cli_reach_the_running_node_at_once(node):
    output = cli(node, "keys", "create", "--name", "from-cli", "--models", "echo", "--rpm", "100")
    [key] = KEY_RE.findall(output)
    assert chat(node, key).status_code == 200  # a key the node has never seen
    openai_error(embed(node, key), 403, code="model_not_allowed")

    # The minute's log holds the request above: a limit of 2 leaves room for one more.
    cli(node, "keys", "update", key, "--models", "none", "--rpm", "2")
    assert embed(node, key).status_code == 200
    openai_error(chat(node, key), 429, code="rate_limit_exceeded")

    cli(node, "tenants", "create", "--name", "cli-tenant", "--models", "gpt-4o*")
    cli(node, "keys", "update", key, "--tenant", "cli-tenant", "--rpm", "none")
    openai_error(chat(node, key), 403, code="model_not_allowed")
    cli(node, "tenants", "update", "cli-tenant", "--models", "none")
    assert chat(node, key).status_code == 200

    with admin(node) as client:
        shown = client.get(f"/admin/keys/{key}").json()
    assert shown["tenant"] == "cli-tenant" and "rpm" not in shown["limits"]

    rotated = cli(node, "keys", "rotate", key, "--grace", "0")
    [new] = KEY_RE.findall(rotated)
    openai_error(chat(node, key), 401)
    assert chat(node, new).status_code == 200

    cli(node, "keys", "revoke", new)
    openai_error(chat(node, new), 401, code="invalid_api_key")
    assert audit(node, action="key.revoke")[0]["actor"].startswith("cli:")
