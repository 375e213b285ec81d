"""Every backend keeps the same promises (`node/storage/base.py`): each aggregate's writes and
reads, run against SQLite and a real PostgreSQL alike, with what must hold under concurrency
(no budget passed, no limit granted twice, no nonce accepted twice, no invite overused)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from ledger.receipts import GENESIS
from node.storage.base import Store
from node.storage.records import (
    HOLD_TTL,
    AuditEvent,
    CachedAnswer,
    Conflict,
    Hold,
    InteractionLog,
    InviteRow,
    JoinRequestBounds,
    KeyRecord,
    LinkedReceipt,
    LogFilter,
    PeerRecord,
    RateSync,
    RateTake,
    StoredReceipt,
    StoredResponse,
    TenantRecord,
    body_hash,
)
from tests.postgres import open_test_store
from tests.test_storage import charge

Test = Callable[[Store], Awaitable[None]]


def on(url: str, test: Test) -> None:
    async def run() -> None:
        store = await open_test_store(url)
        try:
            await test(store)
        finally:
            await store.close()

    asyncio.run(run())


def key(key_id: str, *, is_admin: bool = False, **fields: object) -> KeyRecord:
    return KeyRecord(key_id, f"name-{key_id}", b"\x00h" + key_id.encode(), is_admin, 1, **fields)


def test_keys_and_tenants(store_url: str) -> None:
    async def test(store: Store) -> None:
        await store.keys.insert_tenant(TenantRecord("t1", "acme", {}, {"a": "b"}, 1))
        try:
            await store.keys.insert_tenant(TenantRecord("t2", "acme", {}, {}, 2))
        except Conflict:
            pass
        else:
            raise AssertionError("a taken tenant name is a Conflict")
        assert (await store.keys.tenant("acme")).id == "t1"  # type: ignore[union-attr]
        await store.keys.insert_key(key("k1", tenant_id="t1", allowed_ips=["10.0.0.0/8"]))
        await store.keys.insert_key(key("k2", is_admin=True))
        k1 = await store.keys.key("k1")
        assert k1 is not None and k1.allowed_ips == ["10.0.0.0/8"] and k1.hash == b"\x00hk1"
        k1.revoked_at = 5
        await store.keys.save_key(k1)
        assert [k.id for k in await store.keys.active_keys()] == ["k2"]
        assert [k.id for k in await store.keys.keys()] == ["k1", "k2"]

    on(store_url, test)


def test_no_budget_is_passed_by_concurrent_reservations(store_url: str) -> None:
    async def test(store: Store) -> None:
        scopes = [("key:k1", 0), ("tenant:t1", 0)]
        await store.spend.open_periods([("key:k1", 0, 1000), ("tenant:t1", 0, 10**18)])
        granted = await asyncio.gather(*(store.spend.reserve(30, scopes) for _ in range(200)))
        assert sum(granted) == 1000 // 30
        rows = {row.scope: row for row in await store.spend.spend(scopes)}
        assert rows["key:k1"].reserved == 30 * (1000 // 30)
        # Settled at a lower cost: the reservation turns into spend, once, however often
        # the batch is written.
        held = [charge(f"r{n}", cost=10) for n in range(3)]
        for c in held:
            c.holds = [Hold("key:k1", 0, 30)]
        first = await store.usage.write_batch(held, [AuditEvent(1, "key.use", "k1")])
        again = await store.usage.write_batch(held, [])
        row = (await store.spend.spend(scopes[:1]))[0]
        assert (row.spent, row.reserved) == (30, 30 * (1000 // 30) - 90)
        # The batch answers the spend it settled, as its transaction left it (the alerts'
        # read), the second time too; a batch that settles nothing reads nothing.
        assert first == again == [row]
        assert await store.usage.write_batch([], []) == []
        await store.spend.release([(30, ("key:k1", 0))])
        await store.spend.release_all_reservations()
        assert (await store.spend.spend(scopes[:1]))[0].reserved == 0
        assert not await store.spend.reserve(10**18, scopes)
        assert await store.spend.claim_alert("key:k1", 0, 50)
        assert not await store.spend.claim_alert("key:k1", 0, 50)
        report = await store.usage.usage_report("key", 0)
        assert (report[0].group, report[0].requests, report[0].cost_micros) == ("k1", 3, 30)
        assert [e.action for e in await store.audit.audit(action="key.*")] == ["key.use"]

    on(store_url, test)


def test_rate_limits_are_granted_once_across_stores(store_url: str) -> None:
    """Two stores (two processes' pools) taking from one limit at once grant it once."""

    async def test(store: Store) -> None:
        other = await open_test_store(store_url)
        try:

            async def take(s: Store, holder: str) -> int:
                sync = RateSync(holder, 100, takes=[RateTake("key:k1", "requests", 50, 3)])
                return sum((await s.spend.rate_sync(sync)).granted)

            grants = await asyncio.gather(
                *(take(s, f"h{n}") for n in range(40) for s in (store, other))
            )
            assert sum(grants) == 50
            slots = RateSync("h1", 100, takes=[RateTake("key:k1", "parallel", 2, 5)])
            assert (await store.spend.rate_sync(slots)).granted == [2]
            assert (await other.spend.rate_sync(slots)).refused == 0
            await store.spend.release_slots("h1")
            assert (await other.spend.rate_sync(slots)).granted == [2]
            await store.prune(10_000)
        finally:
            await other.close()

    on(store_url, test)


def test_nonces_invites_and_join_requests(store_url: str) -> None:
    async def test(store: Store) -> None:
        claims = await asyncio.gather(*(store.peers.claim_nonce(b"n1", 50, 10) for _ in range(20)))
        assert sum(claims) == 1
        assert await store.peers.claim_nonce(b"n1", 90, 60)  # expired: taken over
        await store.peers.insert_invite(InviteRow("tok", b"pk", 100, 2, ["echo"], None, "1d", 1))
        assert (await store.peers.invite("tok")).models == ["echo"]  # type: ignore[union-attr]

        async def join(n: int) -> bool:
            peer = PeerRecord(f"node{n}", f"peer{n}", "{}", "active", 1)
            return await store.peers.accept_join("tok", 10, key(f"pk{n}", peer_id=f"node{n}"), peer)

        assert sum(await asyncio.gather(*(join(n) for n in range(10)))) == 2
        assert len(await store.peers.peers()) == 2
        bounds = JoinRequestBounds("1.2.3.4", per_source=2, total=3, ttl=1000)
        answers = await asyncio.gather(
            *(store.peers.add_join_request(f"j{n}", "{}", 5, bounds) for n in range(5))
        )
        assert answers.count(None) == 2 and answers.count("source") == 3
        await store.peers.save_peer_health("node0", True, 12, 5)
        assert (await store.peers.peer_health())["node0"] == (True, 12, 5)
        counts = await asyncio.gather(*(store.peers.next_counter("seq") for _ in range(10)))
        assert sorted(counts) == list(range(1, 11))
        # The advert seq: the clock's second as a floor, and strictly above the last value
        # even when the clock has not moved (a restart within the second) or went back.
        assert await store.peers.next_counter("advert", 1_000) == 1_000
        assert await store.peers.next_counter("advert", 1_000) == 1_001
        assert await store.peers.next_counter("advert", 900) == 1_002
        assert await store.peers.next_counter("advert", 5_000) == 5_000
        floors = await asyncio.gather(
            *(store.peers.next_counter("advert", 5_000) for _ in range(5))
        )
        assert sorted(floors) == list(range(5_001, 5_006))
        # A node-wide job's turn: one claimant of many at once, none for a past turn.
        assert await store.peers.counter("advert") == 5_005
        assert await store.peers.counter("never") == 0
        turns = await asyncio.gather(*(store.peers.claim_turn("job", 7) for _ in range(10)))
        assert sorted(turns) == [False] * 9 + [True]
        assert not await store.peers.claim_turn("job", 6)
        assert await store.peers.claim_turn("job", 8) and await store.peers.claim_turn("other", 8)
        joined = [p.node_id for p in await store.peers.peers()]
        await store.peers.revoke_peer(joined[0], 20)
        assert [p.node_id for p in await store.peers.peers()] == joined[1:]

    on(store_url, test)


def stored(seq: int, prev: str | None, request: str = "") -> StoredReceipt:
    body = f'{{"seq":{seq},"prev":{"null" if prev is None else repr(prev)},"id":"{request}"}}'
    body = body.replace("'", '"')
    return StoredReceipt("p", "c", seq, request or f"r{seq}", body_hash(body), 5, seq, body)


def test_receipts_taken_from_a_peer(store_url: str) -> None:
    async def test(store: Store) -> None:
        first = stored(1, None)
        second = stored(2, body_hash(first.body))
        taken = [LinkedReceipt(first, GENESIS), LinkedReceipt(second, body_hash(first.body))]
        assert await store.ledger.add_receipts(taken) == ([], [])
        assert await store.ledger.add_receipts(taken) == ([], [])  # idempotent
        forged = stored(2, body_hash(first.body), "other")
        conflicts, refused = await store.ledger.add_receipts(
            [LinkedReceipt(forged, body_hash(first.body)), LinkedReceipt(stored(4, "x"), "x")]
        )
        assert [held.id for held, _ in conflicts] == ["r2"] and refused == []
        assert await store.ledger.add_countersignatures("p", "c", [(1, "cs"), (1, "cs2")]) == 1
        assert not await store.ledger.add_countersignature("p", "c", 1, "again")
        assert [r.seq for r in await store.ledger.unsent_countersignatures("c", "p", 10)] == [1]
        await store.ledger.mark_countersignatures_sent(
            await store.ledger.receipts_at("p", "c", [1])
        )
        assert await store.ledger.unsent_countersignatures("c", "p", 10) == []
        assert [r.seq for r in await store.ledger.receipts("p", "c", after_seq=1, limit=1)] == [2]
        assert (await store.ledger.chain_head("p", "c")).seq == 4  # type: ignore[union-attr]
        assert await store.ledger.receipt_pairs() == [("p", "c")]
        assert await store.ledger.add_settlement("p", "c", 2, 7, "{}")
        assert not await store.ledger.add_settlement("p", "c", 2, 7, "{}")
        assert await store.ledger.settlements("p", "c") == ["{}"]
        await store.ledger.add_equivocation("p", "c", 2, "a", "b")
        await store.ledger.add_equivocation("p", "c", 2, "a", "c")
        await store.peers.save_peer(PeerRecord("p", "peer", "{}", "active", 1))
        assert await store.ledger.pending_resyncs("file-1", "me") == set()
        assert await store.ledger.pending_resyncs("file-2", "me") == {"p"}
        await store.ledger.resynced("p")
        assert await store.ledger.pending_resyncs("file-2", "me") == set()
        assert await store.ledger.sent_requests("p", ["nothing"]) == {}

    on(store_url, test)


def test_responses_are_kept_per_key(store_url: str) -> None:
    async def test(store: Store) -> None:
        await store.responses.put(StoredResponse("resp1", "k1", 1, b"{}", b"[]", b"[]"))
        assert await store.responses.get("k2", "resp1") is None
        assert (await store.responses.get("k1", "resp1")).response == b"{}"  # type: ignore[union-attr]
        assert not await store.responses.delete("k2", "resp1")
        assert await store.responses.delete("k1", "resp1")
        assert isinstance(await store.database_id(), str)

    on(store_url, test)


def test_a_dead_holders_budget_holds_are_given_back(store_url: str) -> None:
    """A process's reservations are its own while it renews them; once it stops (killed),
    a prune gives them back, and its completed requests, written later (its journal
    replayed), add their spend without taking another process's reservation."""

    async def test(store: Store) -> None:
        scope = [("key:k1", 0)]
        await store.spend.open_periods([("key:k1", 0, 1000)])
        assert await store.spend.reserve(300, scope, "dead")
        assert await store.spend.reserve(200, scope, "alive")
        now = int(time.time())
        assert len(await store.spend.renew_holds("alive", now + HOLD_TTL)) == 1
        await store.prune(now + HOLD_TTL + 1)  # "dead" expired, "alive" renewed
        (row,) = await store.spend.spend(scope)
        assert (row.spent, row.reserved) == (0, 200)
        assert not await store.spend.renew_holds("dead", now)  # given back: nothing left
        # The dead process's request of 50 (of its 300) is written from its journal: spend
        # only. The live one's of 20 (of its 200) settles its own reservation.
        late, live = charge("late", cost=50), charge("live", cost=20)
        late.holds = [Hold("key:k1", 0, 50, "dead")]
        live.holds = [Hold("key:k1", 0, 20, "alive")]
        await store.usage.write_batch([late, live], [])
        (row,) = await store.spend.spend(scope)
        assert (row.spent, row.reserved) == (70, 180)
        await store.spend.release([(180, ("key:k1", 0))], "alive")
        (row,) = await store.spend.spend(scope)
        assert row.reserved == 0

    on(store_url, test)


def test_cached_answers_are_kept_per_scope_until_they_expire(store_url: str) -> None:
    async def test(store: Store) -> None:
        digest = b"\x01" * 32
        await store.cache.keep(CachedAnswer("tenant:t1", digest, 1000, 5000, b"answer"), 1000, 10)
        assert await store.cache.cached("tenant:t2", digest, 2000) is None  # never another's
        found = await store.cache.cached("tenant:t1", digest, 2000)
        assert found is not None and found.answer == b"answer" and found.expires_ms == 5000
        assert await store.cache.cached("tenant:t1", digest, 5000) is None  # expired
        # Kept again: replaced, with its new expiry.
        await store.cache.keep(CachedAnswer("tenant:t1", digest, 6000, 9000, b"newer"), 6000, 10)
        assert (await store.cache.cached("tenant:t1", digest, 7000)).answer == b"newer"  # type: ignore[union-attr]
        assert await store.cache.prune_cache(9000) == 1
        assert await store.cache.cached("tenant:t1", digest, 1) is None

    on(store_url, test)


def test_the_least_recently_used_answers_go_first(store_url: str) -> None:
    async def test(store: Store) -> None:
        def answer(n: int) -> CachedAnswer:
            return CachedAnswer("key:k1", bytes([n]) * 32, n, 10**12, b"%d" % n)

        for n in range(1, 4):
            await store.cache.keep(answer(n), n, 3)
        assert await store.cache.cached("key:k1", bytes([1]) * 32, 10) is not None  # used
        await store.cache.keep(answer(4), 11, 3)  # one too many: 2 was used least recently
        kept = [n for n in range(1, 5) if await store.cache.cached("key:k1", bytes([n]) * 32, 12)]
        assert kept == [1, 3, 4]

    on(store_url, test)


def _logged(request_id: str, ts_ms: int, **fields: object) -> InteractionLog:
    values: dict[str, object] = {
        "key_id": "k1",
        "tenant_id": "t1",
        "model": "m",
        "endpoint": "chat",
        "deployment": "m#0",
        "peer": None,
        "stream": False,
        "status": 200,
        "tokens_in": 3,
        "tokens_out": 4,
        "cost_micros": 5,
        "latency_ms": 6,
        "cache_hit": False,
        "error": None,
        "request": b'{"q":1}',
        "response": b'{"a":2}',
    }
    values.update(fields)
    return InteractionLog(request_id, ts_ms, **values)  # type: ignore[arg-type]


def test_interaction_logs_are_filtered_and_pruned(store_url: str) -> None:
    async def test(store: Store) -> None:
        await store.logs.insert_log(_logged("r1", 1000))
        await store.logs.insert_log(_logged("r2", 2000, key_id="k2", status=429, stream=True))
        await store.logs.insert_log(_logged("r3", 3000, tenant_id="t2", model="other"))
        await store.logs.insert_log(_logged("r1", 9000, model="again"))  # ignored: the same id
        everything = await store.logs.logs(LogFilter())
        assert [entry.request_id for entry in everything] == ["r3", "r2", "r1"]
        assert everything[1].stream is True and everything[0].cache_hit is False
        assert everything[2].request == b'{"q":1}' and everything[2].findings == b"[]"
        assert [e.request_id for e in await store.logs.logs(LogFilter(key_id="k2"))] == ["r2"]
        assert [e.request_id for e in await store.logs.logs(LogFilter(tenant_id="t2"))] == ["r3"]
        assert [e.request_id for e in await store.logs.logs(LogFilter(model="m"))] == ["r2", "r1"]
        assert [e.request_id for e in await store.logs.logs(LogFilter(status=429))] == ["r2"]
        window = LogFilter(since_ms=1500, until_ms=3000)
        assert [e.request_id for e in await store.logs.logs(window)] == ["r2"]
        assert len(await store.logs.logs(LogFilter(limit=1))) == 1
        assert (await store.logs.log("r2")).key_id == "k2"  # type: ignore[union-attr]
        assert await store.logs.log("nope") is None
        # Older than the retention, then beyond the size cap (each entry holds 16 bytes).
        assert await store.logs.prune_logs(1500, 10**9) == 1
        assert await store.logs.prune_logs(0, 20) == 1  # the newest that fit stay
        assert [e.request_id for e in await store.logs.logs(LogFilter())] == ["r3"]
        # Logs of the same millisecond: newest first is by request id among them.
        for request_id in ("r4", "r6", "r5"):
            await store.logs.insert_log(_logged(request_id, 4000))
        assert await store.logs.prune_logs(0, 40) == 2  # r6 and r5 fit; r4 and r3 go
        assert [e.request_id for e in await store.logs.logs(LogFilter())] == ["r6", "r5"]
        assert await store.logs.prune_logs(0, 40) == 0

    on(store_url, test)
