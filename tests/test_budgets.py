"""No overspend: budgets hold under concurrency, across restarts, and in any interleaving."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from node.admin.management import KeyInput, Management, TenantInput
from node.config import DATABASE_FILE
from node.gateway.policy import period_start
from node.storage import open_store
from node.storage.records import Charge, Hold, UsageRecord
from tests.conftest import NodeDir, concurrent_client, run_node

CAP = 1000


def make_key(directory: Path, **fields: object) -> tuple[str, str]:
    async def create() -> tuple[str, str]:
        admin = await Management.open(directory)
        try:
            tenant = fields.pop("tenant_fields", None)
            if tenant is not None:
                await admin.create_tenant(msgspec.convert(tenant, TenantInput), "test")
            created = await admin.create_key(msgspec.convert(fields, KeyInput), "test")
            return created.key, created.record.id
        finally:
            await admin.close()

    return asyncio.run(create())


def spend_of(directory: Path, scope: str) -> tuple[int, int]:
    async def read() -> tuple[int, int]:
        store = await open_store(directory / DATABASE_FILE)
        try:
            rows = await store.spend.spend([(scope, period_start("monthly", time.time()))])
        finally:
            await store.close()
        return (rows[0].spent, rows[0].reserved) if rows else (0, 0)

    return asyncio.run(read())


def priced_echo(node_dir: NodeDir) -> None:
    # A slow, pricier echo so that many requests hold reservations at once.
    node_dir.set_config(
        'name = "echo"\nprovider = "echo"\nprice_in = 100_000\nprice_out = 200_000',
        'name = "echo"\nprovider = "echo"\nprice_in = 1_000_000\nprice_out = 2_000_000\n'
        "latency_ms = 30",
    )


async def fire(url: str, key: str, count: int) -> list[httpx.Response]:
    body = {
        "model": "echo",
        "messages": [{"role": "user", "content": "hello world"}],
        "max_tokens": 10,
    }
    async with concurrent_client(url, count) as client:
        headers = {"authorization": f"Bearer {key}"}
        return await asyncio.gather(
            *(client.post("/v1/chat/completions", json=body, headers=headers) for _ in range(count))
        )


WORST = 35  # 15 prompt tokens at most ("hello world" + framing) and 10 out, at 1 and 2 per 1M


def test_concurrent_requests_never_pass_the_cap_and_spend_survives_restart(node_dir):
    priced_echo(node_dir)
    key, key_id = make_key(node_dir.path, name="small", budget_micros=CAP)
    charged = 0
    rounds = []
    with run_node(node_dir) as node:
        # Waves of 300 concurrent requests until one wave gets nothing through.
        while not rounds or rounds[-1]:
            responses = asyncio.run(fire(node.url, key, 300))
            statuses = [r.status_code for r in responses]
            assert set(statuses) <= {200, 429}, statuses
            refused = [r for r in responses if r.status_code == 429]
            assert all(r.json()["error"]["code"] == "insufficient_quota" for r in refused)
            served = [r for r in responses if r.status_code == 200]
            charged += sum(int(r.headers["aihub-cost-micros"]) for r in served)
            rounds.append(len(served))
            assert len(rounds) < 50
    spent, reserved = spend_of(node_dir.path, f"key:{key_id}")
    assert spent == charged <= CAP
    assert reserved == 0
    # Reservations were released as requests settled: the budget was used up, not stranded.
    assert CAP - spent < WORST
    assert rounds[0] >= CAP // WORST and rounds[-1] == 0
    # After a restart the spend is still there and still enforced.
    with run_node(node_dir) as node:
        responses = asyncio.run(fire(node.url, key, 5))
    assert [r.status_code for r in responses] == [429] * 5
    assert spend_of(node_dir.path, f"key:{key_id}") == (spent, 0)


def test_tenant_budget_is_shared_by_its_keys(node_dir):
    priced_echo(node_dir)
    key_a, _ = make_key(
        node_dir.path, name="a", tenant="team", tenant_fields={"name": "team", "budget_micros": 200}
    )
    key_b, _ = make_key(node_dir.path, name="b", tenant="team")

    async def both(url: str) -> list[httpx.Response]:
        first, second = await asyncio.gather(fire(url, key_a, 40), fire(url, key_b, 40))
        return first + second

    with run_node(node_dir) as node:
        responses = asyncio.run(both(node.url))
        tenant_id = asyncio.run(_tenant_id(node_dir.path, "team"))
    charged = sum(int(r.headers["aihub-cost-micros"]) for r in responses if r.status_code == 200)
    spent, reserved = spend_of(node_dir.path, f"tenant:{tenant_id}")
    assert spent == charged <= 200 and reserved == 0
    assert any(r.status_code == 429 for r in responses)


async def _tenant_id(directory: Path, name: str) -> str:
    store = await open_store(directory / DATABASE_FILE)
    try:
        tenant = await store.keys.tenant(name)
        assert tenant is not None
        return tenant.id
    finally:
        await store.close()


# --- the reservation statement itself, in any interleaving ---------------------------------

operations = st.lists(
    st.tuples(
        st.sampled_from(["reserve", "settle"]),
        st.integers(min_value=0, max_value=400),  # reserved amount
        st.integers(min_value=0, max_value=400),  # actual cost, at most the reservation
        st.sampled_from([("key:k", 0), ("tenant:t", 0)]),
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(ops=operations, key_cap=st.integers(0, 1000), tenant_cap=st.integers(0, 1000))
def test_reservations_keep_every_scope_within_its_cap(tmp_path_factory, ops, key_cap, tenant_cap):
    path = tmp_path_factory.mktemp("budget") / DATABASE_FILE

    async def run() -> None:
        store = await open_store(path)
        try:
            await store.spend.open_periods([("key:k", 0, key_cap), ("tenant:t", 0, tenant_cap)])
            held: list[tuple[int, list[tuple[str, int]]]] = []
            for index, (op, amount, cost, _) in enumerate(ops):
                scopes = [("key:k", 0), ("tenant:t", 0)]
                if op == "reserve":
                    if await store.spend.reserve(amount, scopes):
                        held.append((amount, scopes))
                elif held:
                    reserved, scopes = held.pop(0)
                    record = _record(f"r{index}", min(cost, reserved))
                    holds = [Hold(scope, start, reserved) for scope, start in scopes]
                    await store.usage.write_batch([Charge(record, holds)], [])
                rows = await store.spend.spend([("key:k", 0), ("tenant:t", 0)])
                caps = {"key:k": key_cap, "tenant:t": tenant_cap}
                for row in rows:
                    assert row.spent + row.reserved <= caps[row.scope]
                    assert row.reserved == sum(a for a, _ in held)
        finally:
            await store.close()

    asyncio.run(run())


def _record(request_id: str, cost: int) -> UsageRecord:
    return UsageRecord(
        request_id=request_id,
        ts_ms=0,
        key_id="k",
        tenant_id="t",
        model="m",
        deployment=None,
        provider=None,
        endpoint="chat",
        stream=False,
        tokens_in=0,
        tokens_out=0,
        estimated=False,
        cost_micros=cost,
        latency_ms=0,
        status=200,
    )


# --- leases: several processes, each handing out reservations from memory ------------------

worker_ops = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=2),  # which worker
        st.integers(min_value=1, max_value=120),  # worst case reserved
        st.integers(min_value=0, max_value=130),  # actual cost (may pass the worst case a bit)
        st.booleans(),  # settle at once, or leave in flight for a while
    ),
    max_size=80,
)


@settings(max_examples=40, deadline=None)
@given(ops=worker_ops, cap=st.integers(0, 2000))
def test_leases_of_several_workers_never_pass_the_cap(tmp_path_factory, ops, cap):
    """Three workers (three connections, three Budgets) share one key's budget. Whatever the
    interleaving, the database never shows more spent and reserved than the cap (beyond what
    requests cost over their own worst case), and once every worker has stopped nothing stays
    reserved."""
    from node.errors import HubError
    from node.gateway.auth import Principal
    from node.gateway.budgets import Budgets
    from node.gateway.policy import Limits
    from node.ingress.errors import openai_status
    from node.storage.records import KeyRecord

    path = tmp_path_factory.mktemp("leases") / DATABASE_FILE
    key = KeyRecord("k1", "k", b"", False, 0, limits=Limits(budget_micros=cap))
    principal = Principal(key)
    start = period_start("monthly", time.time())

    async def run() -> None:
        stores = [await open_store(path) for _ in range(3)]
        workers = [Budgets(store) for store in stores]
        in_flight: list[tuple[int, list[Hold], int]] = []
        overrun = 0  # what requests cost beyond their own worst case
        try:
            for number, (worker, worst, cost, at_once) in enumerate(ops):
                try:
                    holds = await workers[worker].reserve(principal, worst)
                except HubError as exc:
                    assert openai_status(exc) == 429
                    continue
                in_flight.append((worker, holds, cost))
                if at_once or len(in_flight) > 4:
                    done, holds, cost = in_flight.pop(0)
                    overrun += max(0, cost - holds[0].amount)
                    moved = workers[done].settle(holds, cost)
                    await stores[done].usage.write_batch(
                        [Charge(_record(f"r{number}", cost), moved)], []
                    )
                (row,) = await stores[0].spend.spend([("key:k1", start)])
                assert row.spent + row.reserved <= cap + overrun
            for number, (done, holds, _) in enumerate(in_flight):
                moved = workers[done].settle(holds, 0)
                await stores[done].usage.write_batch([Charge(_record(f"f{number}", 0), moved)], [])
            for worker in workers:
                await worker.release()
            rows = await stores[0].spend.spend([("key:k1", start)])
            assert not rows or rows[0].reserved == 0
        finally:
            for store in stores:
                await store.close()

    asyncio.run(run())
