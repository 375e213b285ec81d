"""`/metrics` scraped from real nodes: one charset in its Content-Type, gauges for peers (up,
latency) and for budgets (cap, spent, reserved per key and tenant), with the number of budget
series bounded."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from node.gateway.metrics import MAX_BUDGET_SERIES
from tests.conftest import NodeDir, RunningNode, run_node
from tests.test_federation import LLAMA, cli, invite, make_peer, model_owners, wait_for

HI = [{"role": "user", "content": "hi"}]


def samples(node: RunningNode, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    answer = httpx.get(node.url + "/metrics")
    assert answer.status_code == 200
    return samples_in(answer.text, name)


def samples_in(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of `name` in a scrape, by their sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_one_charset_and_budget_gauges(node_dir: NodeDir) -> None:
    with run_node(node_dir) as node, node.client() as admin:
        content_type = httpx.get(node.url + "/metrics").headers["content-type"]
        assert content_type == "text/plain; version=0.0.4; charset=utf-8"
        tenant = admin.post("/admin/tenants", json={"name": "team", "budget_micros": 9_000_000})
        created = admin.post(
            "/admin/keys", json={"name": "spender", "tenant": "team", "budget_micros": 2_000_000}
        ).json()
        key_id, tenant_id = created["record"]["id"], tenant.json()["id"]
        sdk = openai.OpenAI(base_url=node.url + "/v1", api_key=created["key"], max_retries=0)
        sdk.chat.completions.create(model="echo", messages=HI)
        # The charge is written by the usage writer: wait for the store to have it.
        assert wait_for(
            lambda: admin.get(f"/admin/keys/{key_id}").json()["spend"]["spent_micros"] > 0
        )
        spend = admin.get(f"/admin/keys/{key_id}").json()["spend"]
        spent = spend["spent_micros"]
        key_labels = (("id", key_id), ("kind", "key"))
        assert samples(node, "aihub_budget_cap_micros")[key_labels] == 2_000_000
        assert samples(node, "aihub_budget_spent_micros")[key_labels] == spent
        # What the process holds leased of the budget counts as reserved, as the API says.
        reserved = samples(node, "aihub_budget_reserved_micros")[key_labels]
        assert reserved == spend["reserved_micros"]
        tenant_labels = (("id", tenant_id), ("kind", "tenant"))
        assert samples(node, "aihub_budget_spent_micros")[tenant_labels] == spent
        assert samples(node, "aihub_budget_cap_micros")[tenant_labels] == 9_000_000
        # The admin key has no budget: no series.
        assert len(samples(node, "aihub_budget_cap_micros")) == 2
        assert samples(node, "aihub_budget_series_omitted")[()] == 0


def test_budget_series_are_bounded(node_dir: NodeDir) -> None:
    with run_node(node_dir) as node, node.client() as admin:
        extra = 5
        for i in range(MAX_BUDGET_SERIES + extra):
            made = admin.post("/admin/keys", json={"name": f"k{i}", "budget_micros": 1_000_000})
            assert made.status_code == 201
        assert len(samples(node, "aihub_budget_cap_micros")) == MAX_BUDGET_SERIES
        assert samples(node, "aihub_budget_series_omitted")[()] == extra


def test_peer_gauges(tmp_path: Path) -> None:
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    with alice.run(), bob.run() as b:
        cli("join", invite(alice), "--data-dir", str(bob.path))
        assert wait_for(lambda: model_owners(b).get("llama3") == "alice", 20)
        assert wait_for(lambda: samples(b, "aihub_peer_up").get((("peer", "alice"),)) == 1, 20)
        latency = samples(b, "aihub_peer_latency_seconds")[(("peer", "alice"),)]
        assert 0 <= latency < 60
