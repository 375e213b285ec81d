"""What the federated hop adds per request, step by step, measured in one process on the real
code (no HTTP, no upstream): the consumer's request signature, the provider's check of it and
its durable nonce record, the provider's receipt (usage record, spend and receipt in one
transaction; and eight asked for at once, which share one), the consumer's check and
countersignature of that receipt, and the provider's check of the countersignatures that come
back in batches, with the event loop's longest stall while a batch of them is checked (what a
request in flight meanwhile waits).

    taskset -c 0 .venv/bin/python -m bench.hop

Only APIs older checkouts have too are used, so the same file measures an older one
(`PYTHONPATH=/path/to/old/checkout python bench/hop.py`): see bench/README.md, "The hop".
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from federation.httpsig import check_request, sign_request
from federation.identity import NodeIdentity
from federation.ids import new_request_id
from federation.nonces import NonceCache
from ledger.canonical import b64url
from ledger.receipts import SentRequest, countersign, parse_receipt, public_key_of
from node.peers.receipts import Receipts, _Taken
from node.storage import open_store
from node.storage.records import Charge, UsageRecord

ROUNDS = 400
BATCH = 500  # the countersignatures a consumer sends at once (COUNTERSIGNATURE_BATCH)
URL = "http://127.0.0.1:8787/v1/chat/completions"
BODY = msgspec.json.encode(
    {
        "model": "mock",
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Say hello in five words."},
        ],
        "max_tokens": 16,
    }
)


class _Peering:
    """What `Receipts` reads of the peering: the advert seq it prices under, the peers."""

    advert_seq = 1
    peers: dict[str, Any] = {}


def _each(work: Callable[[], object], rounds: int = ROUNDS) -> float:
    """CPU µs per call of `work`, the median of five runs of `rounds` calls."""
    runs = []
    for _ in range(5):
        started = time.process_time()
        for _ in range(rounds):
            work()
        runs.append((time.process_time() - started) / rounds * 1e6)
    return statistics.median(runs)


def _charge(request_id: str, key_id: str) -> Charge:
    record = UsageRecord(
        request_id=request_id,
        ts_ms=int(time.time() * 1000),
        key_id=key_id,
        tenant_id=None,
        model="mock",
        deployment="mock",
        provider="openai",
        endpoint="chat",
        stream=False,
        tokens_in=24,
        tokens_out=16,
        estimated=False,
        cost_micros=14,
        latency_ms=1,
        status=200,
    )
    return Charge(record)


async def _stalled(work: Callable[[], Any]) -> tuple[float, float]:
    """How long `work()` (awaited) takes, and the longest the event loop went without running
    a task that asks to run every millisecond meanwhile (ms, ms)."""
    longest = 0.0
    running = True

    async def tick() -> None:
        nonlocal longest
        last = time.perf_counter()
        while running:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            longest = max(longest, now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.01)
    started = time.perf_counter()
    await work()
    took = time.perf_counter() - started
    running = False
    await ticker
    return took * 1000, longest * 1000


async def _measure() -> dict[str, float]:
    provider, consumer = NodeIdentity.generate(), NodeIdentity.generate()
    figures: dict[str, float] = {}

    # The consumer signs the call; the provider checks it and remembers its nonce.
    headers = {"aihub-request-id": new_request_id(), "authorization": "Bearer sk-hub-bench"}
    headers |= {"content-type": "application/json", "aihub-hop": "1"}
    figures["consumer: request signature"] = _each(
        lambda: sign_request(consumer, "POST", URL, headers, BODY)
    )
    signed = {**headers, **sign_request(consumer, "POST", URL, headers, BODY)}
    key = public_key_of(consumer.node_id)
    now = int(time.time())
    figures["provider: signature check"] = _each(
        lambda: check_request("POST", URL, signed, BODY, public_key_for=lambda _: key, now=now)
    )
    nonces = NonceCache()
    fresh = iter(range(10**9))
    figures["provider: nonce cache"] = _each(
        lambda: nonces.remember(consumer.node_id, f"nonce-{next(fresh):012d}", now + 360, now)
    )

    with tempfile.TemporaryDirectory() as folder:
        store = await open_store(Path(folder) / "provider.db")
        theirs = await open_store(Path(folder) / "consumer.db")
        try:
            figures.update(await _ledger(store, theirs, provider, consumer, now))
        finally:
            await store.close()
            await theirs.close()
    return figures


async def _ledger(
    store: Any, theirs: Any, provider: NodeIdentity, consumer: NodeIdentity, now: int
) -> dict[str, float]:
    figures: dict[str, float] = {}
    for _ in range(100):  # warm the page cache and both connections
        await store.peers.claim_nonce(os.urandom(16), now + 600, now)
    started = time.process_time()
    for _ in range(ROUNDS):
        await store.peers.claim_nonce(os.urandom(16), now + 600, now)
    figures["provider: durable nonce record"] = (time.process_time() - started) / ROUNDS * 1e6

    ours = Receipts(provider, store, None, _Peering())  # type: ignore[arg-type]
    issued: list[bytes] = []
    ids = [new_request_id() for _ in range(ROUNDS + BATCH)]
    for request_id in ids[:50]:  # warm
        issued.append(await ours.issue(_charge(request_id, "k"), consumer.node_id, request_id, "k"))
    started = time.process_time()
    for request_id in ids[50 : ROUNDS + 50]:
        issued.append(await ours.issue(_charge(request_id, "k"), consumer.node_id, request_id, "k"))
    figures["provider: receipt (one transaction)"] = (time.process_time() - started) / ROUNDS * 1e6
    # Eight asked for at once, as peers' answers that arrive together are (concurrency 8+).
    together = [new_request_id() for _ in range(ROUNDS)]
    started = time.process_time()
    for at in range(0, ROUNDS, 8):
        await asyncio.gather(
            *(ours.issue(_charge(r, "k"), consumer.node_id, r, "k") for r in together[at : at + 8])
        )
    figures["provider: receipt, eight asked at once (each)"] = (
        (time.process_time() - started) / ROUNDS * 1e6
    )
    for request_id in ids[ROUNDS + 50 :]:
        issued.append(await ours.issue(_charge(request_id, "k"), consumer.node_id, request_id, "k"))

    # The consumer checks and countersigns each receipt it is handed (in a header: base64url).
    mine = Receipts(consumer, theirs, None, _Peering())  # type: ignore[arg-type]
    sent = {rid: SentRequest(rid, provider.node_id, "mock", 1, 150_000, 600_000) for rid in ids}
    taken = [_Taken(sent[parse_receipt(body).id], b64url(body).encode(), 14) for body in issued]
    rounds = iter(taken * 5)
    figures["consumer: receipt check + countersignature"] = _each(
        lambda: mine._checked(next(rounds)), rounds=len(taken) // 5
    )

    # The provider checks a batch of countersignatures coming back.
    csigs = []
    for body in issued[-BATCH:]:
        receipt = countersign(parse_receipt(body), consumer.sign)
        csigs.append({"seq": receipt.seq, "id": receipt.id, "csig": receipt.csig})
    batch = msgspec.json.encode({"csigs": csigs})
    cpu = time.process_time()
    took, stall = await _stalled(lambda: ours.take_countersignatures(consumer.node_id, batch))
    cpu = (time.process_time() - cpu) / BATCH * 1e6
    figures["provider: countersignature check (per receipt, batch of 500)"] = cpu
    figures["provider: a batch of 500 countersignatures, wall ms"] = took
    figures["provider: event loop's longest stall during that batch, ms"] = stall
    return figures


def main() -> None:
    figures = asyncio.run(_measure())
    where = Path(sys.modules["node"].__file__ or "").parent.parent
    print(f"the hop's own steps, code at {where} (CPU us per request unless said):")
    for name, value in figures.items():
        print(f"  {value:9.1f}  {name}")


if __name__ == "__main__":
    main()
