"""Budget alerts: a webhook at 50/80/100 % of a budget, once per period, retried, audited."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from node.config import DATABASE_FILE
from node.storage import open_store
from tests.conftest import NodeDir, run_node
from tests.mocks.script import read_body
from tests.mocks.server import serve_app
from tests.test_budgets import make_key


class Receiver:
    """A webhook endpoint that fails its first `failures` deliveries with a 503."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.attempts = 0
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        body = await read_body(receive)
        with self.lock:
            self.attempts += 1
            failing = self.attempts <= self.failures
            if not failing:
                self.events.append(msgspec.json.decode(body))
        status = 503 if failing else 204
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def wait_for(predicate, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def configure(node_dir: NodeDir, url: str) -> None:
    node_dir.set_config('webhook_url = ""', f'webhook_url = "{url}/hook"')
    node_dir.set_config("backoff_base = 1.0  ", "backoff_base = 0.05  ")
    # Each request costs 10 micro-units: a 10-token prompt estimate... kept simple by price.
    node_dir.set_config(
        'name = "echo"\nprovider = "echo"\nprice_in = 100_000\nprice_out = 200_000',
        'name = "echo"\nprovider = "echo"\nprice_in = 1_000_000\nprice_out = 1_000_000',
    )


@pytest.fixture
def receiver() -> Iterator[tuple[str, Receiver]]:
    hook = Receiver(failures=2)
    with serve_app(hook) as url:
        yield url, hook


def chat(node, key: str) -> int:
    import httpx

    response = httpx.post(
        node.url + "/v1/chat/completions",
        json={"model": "echo", "messages": [{"role": "user", "content": "abcd"}], "max_tokens": 2},
        headers={"authorization": f"Bearer {key}"},
    )
    return response.status_code


def audit_actions(node_dir: NodeDir) -> list[str]:
    async def read() -> list[str]:
        store = await open_store(node_dir.path / DATABASE_FILE)
        try:
            return [event.action for event in await store.audit.audit(limit=1000)]
        finally:
            await store.close()

    return asyncio.run(read())


def test_thresholds_fire_once_each_with_retries(node_dir, receiver):
    url, hook = receiver
    configure(node_dir, url)
    # A request costs 7 micro-units (5 prompt + 2 out) and reserves 12 (10 + 2) at most.
    key, key_id = make_key(node_dir.path, name="alerting", budget_micros=70)
    with run_node(node_dir) as node:
        statuses = [chat(node, key) for _ in range(12)]
        assert wait_for(lambda: len(hook.events) >= 3)
        time.sleep(0.3)  # no duplicates arrive later
    assert statuses[:5] == [200] * 5 and statuses[-1] == 429
    # Each once; the order of arrival may differ, since a failed delivery is retried later.
    assert sorted(event["threshold"] for event in hook.events) == [50, 80, 100]
    for event in hook.events:
        assert event["event"] == "budget.threshold"
        assert event["scope"] == f"key:{key_id}" and event["cap_micros"] == 70
        assert event["node"] == "alice"
    fifty = next(event for event in hook.events if event["threshold"] == 50)
    assert 35 <= fifty["spent_micros"] < 56
    # The first two deliveries failed with 503 and were retried.
    assert hook.attempts == len(hook.events) + 2
    actions = audit_actions(node_dir)
    assert actions.count("budget.alert") == 3
    assert actions.count("budget.alert_delivered") == 3
    assert "limit.budget" in actions


def test_alerts_without_webhook_still_reach_the_audit_log(node_dir):
    node_dir.set_config(
        'name = "echo"\nprovider = "echo"\nprice_in = 100_000\nprice_out = 200_000',
        'name = "echo"\nprovider = "echo"\nprice_in = 1_000_000\nprice_out = 1_000_000',
    )
    key, _ = make_key(node_dir.path, name="quiet", budget_micros=20)
    with run_node(node_dir) as node:
        for _ in range(4):
            chat(node, key)
        assert wait_for(lambda: "budget.alert" in audit_actions(node_dir))
    assert "budget.alert_delivered" not in audit_actions(node_dir)
