"""Interaction logs on a real node: what a key (or a tenant's keys) that opted in asked and was
answered, through the official `openai` SDK, read back with `/admin/logs` and `aihub logs`;
never a header or a key; bounded bodies; hostile queries refused in OpenAI's error shape."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest

from node.storage import open_store
from node.storage.records import UsageRecord
from tests.conftest import NodeDir, RunningNode, run_node
from tests.test_admin_api import create_key, create_tenant, patch_key
from tests.test_keys_cli import as_json, invoke, squash

HELLO = [{"role": "user", "content": "remember the number 42"}]


def client(node: RunningNode, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key=key, max_retries=0)


def admin_get(node: RunningNode, path: str, **params: str) -> httpx.Response:
    headers = {"authorization": f"Bearer {node.key}"}
    return httpx.get(node.url + path, params=params, headers=headers, timeout=10)


def ask(node: RunningNode, key: str, **extra: Any) -> Any:
    return client(node, key).chat.completions.with_raw_response.create(
        model="echo", messages=HELLO, **extra
    )


def usage_records(node_dir: NodeDir) -> dict[str, UsageRecord]:
    async def read() -> list[UsageRecord]:
        store = await open_store(node_dir.path / "aihub.db")
        try:
            return await store.usage.usage_since(0)
        finally:
            await store.close()

    return {record.request_id: record for record in asyncio.run(read())}


def test_a_logged_key_s_requests_and_answers_are_kept(node_dir: NodeDir) -> None:
    with run_node(node_dir) as node:
        key, record = create_key(node, log=True)
        quiet, _ = create_key(node)
        plain = ask(node, key)
        streamed = client(node, key).chat.completions.create(
            model="echo", messages=HELLO, stream=True
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
        ask(node, quiet)
        listed = admin_get(node, "/admin/logs").json()["logs"]
        assert [entry["key_id"] for entry in listed] == [record["id"]] * 2  # not the quiet one
        newest, oldest = listed
        assert newest["stream"] is True and oldest["stream"] is False
        assert oldest["request_id"] == plain.headers["aihub-request-id"]
        assert oldest["status"] == 200 and oldest["model"] == "echo"
        assert oldest["tokens_out"] > 0 and oldest["cost_micros"] > 0
        assert oldest["deployment"] and "request" not in oldest  # a list holds no bodies

        whole = admin_get(node, f"/admin/logs/{oldest['request_id']}").json()
        assert json.loads(whole["request"])["messages"] == HELLO
        answer = json.loads(whole["response"])
        assert (
            answer["choices"][0]["message"]["content"] == plain.parse().choices[0].message.content
        )
        assert whole["findings"] == [] and whole["truncated"] is False
        stream_entry = admin_get(node, f"/admin/logs/{newest['request_id']}").json()
        assert json.loads(stream_entry["response"]) == {"stream_text": text}
        for entry in (whole, stream_entry):
            dumped = json.dumps(entry)
            assert key not in dumped and node.key not in dumped
            assert "authorization" not in dumped.lower() and "bearer" not in dumped.lower()

        # Filters: by key, model, status, time.
        assert len(admin_get(node, "/admin/logs", key=record["id"]).json()["logs"]) == 2
        assert admin_get(node, "/admin/logs", key="nobody").json()["logs"] == []
        assert admin_get(node, "/admin/logs", model="other").json()["logs"] == []
        assert admin_get(node, "/admin/logs", status="429").json()["logs"] == []
        assert admin_get(node, "/admin/logs", since="2999-01-01").json()["logs"] == []
        assert len(admin_get(node, "/admin/logs", limit="1").json()["logs"]) == 1
        request_id = oldest["request_id"]

    # The usage record links to its entry; a request not logged links to none.
    records = usage_records(node_dir)
    assert records[request_id].log_id == request_id
    assert all(r.log_id is None for r in records.values() if r.key_id != record["id"])

    # `aihub logs`, on the data folder.
    listed = as_json(node_dir.path, "logs", "--key", record["id"])["logs"]
    assert [entry["request_id"] for entry in listed][-1] == request_id
    for name in (record["name"], key):  # by its name, by the key itself: the same entries
        assert as_json(node_dir.path, "logs", "--key", name)["logs"] == listed
    unknown = invoke(node_dir.path, "logs", "--tenant", "nobody")  # not a quiet empty table
    assert unknown.exit_code == 1 and "no tenant 'nobody'" in unknown.output
    shown = as_json(node_dir.path, "logs", request_id)
    assert json.loads(shown["request"])["messages"] == HELLO
    table = invoke(node_dir.path, "logs", request_id)
    assert table.exit_code == 0 and "rememberthenumber42" in squash(table.output).replace("│", "")
    missing = invoke(node_dir.path, "logs", "req_nope")
    assert missing.exit_code == 1 and "no interaction log" in missing.output
    refused = invoke(node_dir.path, "logs", "--status", "abc")
    assert refused.exit_code == 1 and "--status" in refused.output


def test_a_tenant_logs_its_keys_unless_a_key_says_otherwise(node_dir: NodeDir) -> None:
    with run_node(node_dir) as node:
        made = create_tenant(node, log=True)
        tenant = made["id"]
        member, member_record = create_key(node, tenant=tenant)
        opted_out, _ = create_key(node, tenant=tenant, log=False)
        ask(node, member)
        ask(node, opted_out)
        listed = admin_get(node, "/admin/logs", tenant=tenant).json()["logs"]
        assert [entry["key_id"] for entry in listed] == [member_record["id"]]
        # Turned off later: no more entries.
        patch_key(node, member_record["id"], log=False)
        ask(node, member)
        assert len(admin_get(node, "/admin/logs", tenant=tenant).json()["logs"]) == 1
    by_id = as_json(node_dir.path, "logs", "--tenant", tenant)["logs"]
    assert (
        len(by_id) == 1
        and as_json(node_dir.path, "logs", "--tenant", made["name"])["logs"] == by_id
    )


def test_bodies_are_cut_at_their_bound(node_dir: NodeDir) -> None:
    node_dir.set_config("max_body_bytes = 65536 ", "max_body_bytes = 256 ")
    with run_node(node_dir) as node:
        key, _ = create_key(node, log=True)
        long = [{"role": "user", "content": "x" * 5000}]
        client(node, key).chat.completions.create(model="echo", messages=long)
        entry = admin_get(node, "/admin/logs").json()["logs"][0]
        assert entry["truncated"] is True
        whole = admin_get(node, f"/admin/logs/{entry['request_id']}").json()
        assert len(whole["request"].encode()) <= 256 and len(whole["response"].encode()) <= 256


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "²"}, "limit"),
        ({"limit": "100000"}, "limit"),
        ({"status": "abc"}, "status"),
        ({"status": "99"}, "status"),
        ({"since": "yesterday-ish"}, "since"),
        ({"until": "\x00"}, "until"),
    ],
)
def test_hostile_queries_are_refused(node_dir: NodeDir, params: dict[str, str], param: str) -> None:
    with run_node(node_dir) as node:
        response = admin_get(node, "/admin/logs", **params)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error"


def test_only_an_admin_reads_the_logs(node_dir: NodeDir) -> None:
    with run_node(node_dir) as node:
        key, _ = create_key(node, log=True)
        ask(node, key)
        for path in ("/admin/logs", "/admin/logs/anything"):
            response = httpx.get(
                node.url + path, headers={"authorization": f"Bearer {key}"}, timeout=10
            )
            assert response.status_code == 403
        unknown = admin_get(node, "/admin/logs/req_" + "z" * 500)
        assert unknown.status_code == 404 and unknown.json()["error"]["message"]
