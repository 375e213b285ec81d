"""Budget refusals and alerts as a person reads them, on a real node: amounts in the node's
currency, the key by its name, a reservation for requests without max_tokens that the
deployment chooses (`reserve_output_tokens`), and a 100 % alert only when something was
spent (or reserved), saying which. (A request without max_tokens is served capped while its
budget has room for the floor: tests/test_budget_capped.py.)"""

from __future__ import annotations

import asyncio

import openai
import pytest

from node.config import DATABASE_FILE
from node.gateway.pipeline import LEAST_OUTPUT_TOKENS
from node.storage import open_store
from tests.conftest import NodeDir, run_node
from tests.test_budgets import make_key

ECHO = 'name = "echo"\nprovider = "echo"\nprice_in = 100_000\nprice_out = 200_000'
PRICED = 'name = "echo"\nprovider = "echo"\nprice_in = 1_000_000\nprice_out = 1_000_000'
HI = [{"role": "user", "content": "hi there"}]


def alerts(node_dir: NodeDir) -> list[dict]:
    async def read() -> list[dict]:
        store = await open_store(node_dir.path / DATABASE_FILE)
        try:
            events = await store.audit.audit(limit=1000, action="budget.alert")
            return [event.detail for event in events]
        finally:
            await store.close()

    return asyncio.run(read())


def client(node, key: str) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=node.url + "/v1", api_key=key, max_retries=0)


def test_a_refusal_speaks_money_and_names_the_key_and_no_alert_fires_with_nothing_spent(node_dir):
    node_dir.set_config('currency = "USD"', 'currency = "EUR"')
    node_dir.set_config(ECHO, PRICED)
    key, key_id = make_key(node_dir.path, name="team-app", budget_micros=50)
    with run_node(node_dir) as node:
        # No max_tokens: 4,096 output tokens at €1/1M would be reserved, more than the
        # €0.00005 cap, and not even the floor it may be capped at fits.
        with pytest.raises(openai.RateLimitError) as refused:
            client(node, key).chat.completions.create(model="echo", messages=HI)
        body = refused.value.body
        assert isinstance(body, dict) and body["code"] == "insufficient_quota"
        message = body["message"]
        assert "key `team-app`" in message and "€0.00005" in message and "monthly" in message
        assert key_id not in message and "micro" not in message
        assert f"down to {LEAST_OUTPUT_TOKENS} output tokens" in message
        assert "max_tokens" in message
        # With max_tokens the worst case fits.
        reply = client(node, key).chat.completions.create(model="echo", messages=HI, max_tokens=8)
        assert reply.choices[0].message.content
    # Nothing was spent when the first was refused: no "100 %" alert for it.
    assert [a for a in alerts(node_dir) if a["threshold"] == 100] == []


def test_a_deployment_chooses_what_a_request_without_max_tokens_reserves(node_dir):
    node_dir.set_config(ECHO, PRICED + "\nreserve_output_tokens = 64")
    key, _ = make_key(node_dir.path, name="small", budget_micros=300)
    with run_node(node_dir) as node:
        answered = 0
        with pytest.raises(openai.RateLimitError) as refused:
            for _ in range(200):
                client(node, key).chat.completions.create(model="echo", messages=HI)
                answered += 1
        # Each reserves ~70 micro-units, not 4,100: most of the budget is used before the
        # first refusal.
        assert answered >= 5
        assert "key `small`" in refused.value.body["message"]  # type: ignore[index]
    # Less than all of it is spent: the alert says it is based on a refusal, with the
    # figures (not "100 % spent").
    (alert,) = [a for a in alerts(node_dir) if a["threshold"] == 100]
    assert alert["basis"] == "refused"
    assert 0 < alert["spent_micros"] < 300 and "reserved_micros" in alert


def test_a_tenants_refusal_names_the_tenant(node_dir):
    node_dir.set_config(ECHO, PRICED)
    key, _ = make_key(
        node_dir.path,
        name="worker",
        tenant="acme",
        tenant_fields={"name": "acme", "budget_micros": 50},
    )
    with run_node(node_dir) as node, pytest.raises(openai.RateLimitError) as refused:
        client(node, key).chat.completions.create(model="echo", messages=HI)
    message = refused.value.body["message"]  # type: ignore[index]
    assert "tenant `acme`" in message and "$0.00005" in message
