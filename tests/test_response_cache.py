"""The response cache on a real node, through the official `openai` SDK: a kept answer (and a
kept stream, event for event) comes back without asking the upstream, for nothing, marked
`aihub-cache: hit`; per tenant, opt-in per model, tenant and key, bypassed on request."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import msgspec
import openai
import pytest

from adapters.types import ChatCall, ChatRequest, Usage
from node.config import CacheSection
from node.gateway.auth import Principal
from node.gateway.cache import CacheSlot, Kept, ResponseCache, canonical_digest, header_bypass
from node.gateway.metrics import Metrics
from node.storage import open_store
from node.storage.records import KeyRecord, Limits, UsageRecord
from tests.conftest import NodeDir, RunningNode, run_node
from tests.mocks.openai_mock import OpenAIMock
from tests.mocks.server import serve_app
from tests.test_admin_api import create_key, create_tenant, patch_key
from tests.test_routing import wait_for

HELLO = [{"role": "user", "content": "what is the capital of France"}]


class Counted:
    """The upstream, counting the chat requests it is asked and keeping their bodies."""

    def __init__(self) -> None:
        self.mock = OpenAIMock(api_key=None)
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/chat/completions"):
            return await self.mock(scope, receive, send)
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        self.bodies.append(json.loads(body))
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.mock(scope, replay, send)

    @property
    def calls(self) -> int:
        return len(self.bodies)


class Cached:
    def __init__(self, node: RunningNode, upstream: Counted) -> None:
        self.node = node
        self.upstream = upstream

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.node.url + "/v1", api_key=key or self.node.key, max_retries=0
        )


@pytest.fixture
def cached(node_dir: NodeDir) -> Iterator[Cached]:
    upstream = Counted()
    with serve_app(upstream) as upstream_url:
        cache_models(node_dir, '["cached-*"]')
        node_dir.add_config(priced_model("cached-gpt", upstream_url))
        node_dir.add_config(priced_model("plain-gpt", upstream_url))
        with run_node(node_dir) as node:
            yield Cached(node, upstream)


def priced_model(name: str, upstream_url: str) -> str:
    """A `[[models]]` entry for the counting upstream, priced so that a miss costs something."""
    return f"""
[[models]]
name = "{name}"
provider = "openai"
base_url = "{upstream_url}/v1"
price_in = 1000
price_out = 2000
"""


def cache_models(node_dir: NodeDir, models: str) -> None:
    """The template's `[cache] models`, set."""
    node_dir.set_config("models = []                         # these", f"models = {models}  #")


def ask(client: openai.OpenAI, model: str = "cached-gpt", **extra: Any) -> Any:
    return client.chat.completions.with_raw_response.create(model=model, messages=HELLO, **extra)


def usage_records(node_dir: NodeDir) -> list[UsageRecord]:
    async def read() -> list[UsageRecord]:
        store = await open_store(node_dir.path / "aihub.db")
        try:
            return await store.usage.usage_since(0)
        finally:
            await store.close()

    return asyncio.run(read())


def test_a_repeated_request_is_answered_from_the_cache_for_nothing(
    cached: Cached, node_dir: NodeDir
) -> None:
    client = cached.client()
    first = ask(client)
    assert first.headers["aihub-cache"] == "miss"
    assert int(first.headers["aihub-cost-micros"]) > 0
    second = ask(client)
    assert second.headers["aihub-cache"] == "hit"
    assert second.headers["aihub-cost-micros"] == "0"
    assert cached.upstream.calls == 1
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert second.parse().usage == first.parse().usage

    # The same request spelled otherwise (key order, spacing) is the same request.
    body = json.dumps({"messages": HELLO, "model": "cached-gpt"}, indent=3).encode()
    headers = {"authorization": f"Bearer {cached.node.key}", "content-type": "application/json"}
    again = httpx.post(cached.node.url + "/v1/chat/completions", content=body, headers=headers)
    assert again.status_code == 200 and again.headers["aihub-cache"] == "hit"
    assert cached.upstream.calls == 1

    # Any parameter that changes the answer makes another request.
    other = ask(client, temperature=0.5)
    assert other.headers["aihub-cache"] == "miss"
    assert cached.upstream.calls == 2

    # And Prometheus counts them: two hits, two misses.
    metrics = httpx.get(cached.node.url + "/metrics", headers=headers).text
    assert 'aihub_cache_lookups_total{result="hit"} 2.0' in metrics
    assert 'aihub_cache_lookups_total{result="miss"} 2.0' in metrics


def test_usage_records_mark_hits(node_dir: NodeDir) -> None:
    upstream = Counted()
    with serve_app(upstream) as upstream_url:
        cache_models(node_dir, '["cached-gpt"]')
        node_dir.add_config(priced_model("cached-gpt", upstream_url))
        with run_node(node_dir) as node:
            client = Cached(node, upstream).client()
            miss, hit = ask(client), ask(client)
    records = {record.request_id: record for record in usage_records(node_dir)}
    kept = records[miss.headers["aihub-request-id"]]
    replayed = records[hit.headers["aihub-request-id"]]
    assert not kept.cache_hit and kept.cost_micros > 0 and kept.deployment is not None
    assert replayed.cache_hit and replayed.cost_micros == 0 and replayed.deployment is None
    assert replayed.status == 200 and replayed.tokens_out == kept.tokens_out


def test_a_stream_is_replayed_event_for_event(cached: Cached) -> None:
    client = cached.client()

    def stream() -> tuple[str, list[dict[str, Any]]]:
        raw = client.chat.completions.with_raw_response.create(
            model="cached-gpt",
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
        )
        return raw.headers["aihub-cache"], [chunk.model_dump() for chunk in raw.parse()]

    state, first = stream()
    assert state == "miss"
    again, second = stream()
    assert again == "hit"
    assert second == first  # the same chunks, in the same order: text, finish, usage
    assert first[-1]["usage"]["completion_tokens"] > 0
    assert cached.upstream.calls == 1
    # A stream and a complete answer are kept apart: each has its own shape.
    assert ask(client).headers["aihub-cache"] == "miss"
    assert cached.upstream.calls == 2


def test_no_cache_and_cache_false_bypass_it(cached: Cached) -> None:
    client = cached.client()
    ask(client)
    bypassed = ask(client, extra_headers={"Cache-Control": "no-cache"})
    assert "aihub-cache" not in bypassed.headers
    assert cached.upstream.calls == 2
    fresh = ask(client, extra_body={"cache": False})
    assert "aihub-cache" not in fresh.headers
    assert cached.upstream.calls == 3
    assert all("cache" not in body for body in cached.upstream.bodies)  # never sent upstream
    assert ask(client).headers["aihub-cache"] == "hit"
    # `cache: true` is the default's say, and taken out of the body as well.
    assert ask(client, extra_body={"cache": True}).headers["aihub-cache"] == "hit"


@pytest.mark.parametrize("value", ["yes", 1, None, {"on": True}])
def test_a_cache_field_that_is_not_a_boolean_is_refused(cached: Cached, value: Any) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        ask(cached.client(), extra_body={"cache": value})
    assert refused.value.body["param"] == "cache"  # type: ignore[index]
    assert "true or false" in refused.value.message
    assert cached.upstream.calls == 0


def test_answers_are_kept_per_tenant(cached: Cached) -> None:
    acme = create_tenant(cached.node)["id"]
    globex = create_tenant(cached.node)["id"]
    alice, _ = create_key(cached.node, tenant=acme)
    bob, _ = create_key(cached.node, tenant=acme)
    carol, _ = create_key(cached.node, tenant=globex)
    assert ask(cached.client(alice)).headers["aihub-cache"] == "miss"
    assert ask(cached.client(bob)).headers["aihub-cache"] == "hit"  # the same tenant
    assert ask(cached.client(carol)).headers["aihub-cache"] == "miss"  # never another's
    assert ask(cached.client()).headers["aihub-cache"] == "miss"  # a key of no tenant: its own
    assert cached.upstream.calls == 3


def test_keys_and_tenants_opt_in_and_out(cached: Cached) -> None:
    # The config caches cached-*, not plain-gpt: a key turns it on for itself...
    on, _ = create_key(cached.node, cache=True)
    assert "aihub-cache" not in ask(cached.client(), "plain-gpt").headers
    assert ask(cached.client(on), "plain-gpt").headers["aihub-cache"] == "miss"
    assert ask(cached.client(on), "plain-gpt").headers["aihub-cache"] == "hit"
    # ...or off, whatever the config says, and a tenant's say holds for its keys.
    off, _ = create_key(cached.node, cache=False)
    assert "aihub-cache" not in ask(cached.client(off)).headers
    tenant = create_tenant(cached.node, cache=False)["id"]
    quiet, _ = create_key(cached.node, tenant=tenant)
    assert "aihub-cache" not in ask(cached.client(quiet)).headers
    loud, _ = create_key(cached.node, tenant=tenant, cache=True)  # the key's say comes first
    assert ask(cached.client(loud)).headers["aihub-cache"] == "miss"


def test_a_hit_leaves_a_budget_untouched(cached: Cached) -> None:
    key, record = create_key(cached.node, budget_micros=10**9)
    client = cached.client(key)
    ask(client)

    def spent() -> int:
        with httpx.Client(base_url=cached.node.url, timeout=10) as http:
            view = http.get(
                f"/admin/keys/{record['id']}",
                headers={"authorization": f"Bearer {cached.node.key}"},
            ).json()
        return msgspec.convert(view, dict)["spend"]["spent_micros"]

    for _ in range(200):  # the first answer's charge is written in a batch
        if spent() > 0:
            break
        asyncio.run(asyncio.sleep(0.05))
    before = spent()
    assert before > 0
    for _ in range(3):
        assert ask(client).headers["aihub-cache"] == "hit"
    assert spent() == before


def test_a_free_hit_is_served_on_a_spent_budget_but_not_past_a_rate_limit(
    cached: Cached, node_dir: NodeDir
) -> None:
    """With `bill_hits` off a hit costs nothing, so a key whose budget is spent still gets
    it (a fresh request is refused); its rate limit still counts it; its usage record says
    it was a hit that cost nothing."""
    key, record = create_key(cached.node, budget_micros=10**9)
    client = cached.client(key)
    ask(client)
    patch_key(cached.node, record["id"], budget_micros=1)  # spent: 1 micro, less than used
    for fresh in ({"temperature": 0.3}, {"stream": True}):  # misses: refused for budget
        with pytest.raises(openai.RateLimitError) as refused:
            ask(client, **fresh)
        assert "budget" in refused.value.message.lower()
    hits = [ask(client) for _ in range(2)]
    assert [hit.headers["aihub-cache"] for hit in hits] == ["hit", "hit"]
    assert all(hit.headers["aihub-cost-micros"] == "0" for hit in hits)
    calls = cached.upstream.calls

    patch_key(cached.node, record["id"], rpm=2)  # counted from the next request on
    assert [ask(client).headers["aihub-cache"] for _ in range(2)] == ["hit", "hit"]
    with pytest.raises(openai.RateLimitError) as limited:
        ask(client)
    assert limited.value.code == "rate_limit_exceeded"
    assert cached.upstream.calls == calls
    # The usage record is written after the answer, so the node is still writing it now.
    hit_id = hits[0].headers["aihub-request-id"]
    assert wait_for(lambda: any(r.request_id == hit_id for r in usage_records(node_dir)))
    served = {r.request_id: r for r in usage_records(node_dir)}[hit_id]
    assert served.key_id == record["id"] and served.cache_hit
    assert served.cost_micros == 0 and served.status == 200


def test_the_messages_and_responses_surfaces_are_cached_too(cached: Cached) -> None:
    messages = anthropic.Anthropic(
        base_url=cached.node.url, api_key=cached.node.key, max_retries=0
    ).messages.with_raw_response

    def message() -> Any:
        return messages.create(model="cached-gpt", max_tokens=50, messages=HELLO)  # type: ignore[arg-type]

    first, second = message(), message()
    assert (first.headers["aihub-cache"], second.headers["aihub-cache"]) == ("miss", "hit")
    assert second.parse().content[0].text == first.parse().content[0].text  # type: ignore[union-attr]
    assert cached.upstream.calls == 1

    sdk = anthropic.Anthropic(base_url=cached.node.url, api_key=cached.node.key, max_retries=0)

    def streamed() -> list[str]:
        with sdk.messages.stream(model="cached-gpt", max_tokens=50, messages=HELLO) as stream:  # type: ignore[arg-type]
            return [event.type for event in stream]

    kinds = streamed()
    assert cached.upstream.calls == 2
    assert streamed() == kinds  # the same events, replayed
    assert cached.upstream.calls == 2 and "message_stop" in kinds

    responses = cached.client().responses.with_raw_response
    one = responses.create(model="cached-gpt", input="what is the capital of France")
    two = responses.create(model="cached-gpt", input="what is the capital of France")
    assert (one.headers["aihub-cache"], two.headers["aihub-cache"]) == ("miss", "hit")
    assert two.parse().output_text == one.parse().output_text
    assert two.parse().id != one.parse().id  # each answer is a response of its own
    assert cached.upstream.calls == 3


def _principal(**key_fields: Any) -> Principal:
    return Principal(KeyRecord("k1", "app", b"h", False, 1, **key_fields))


def _call(body: dict[str, Any]) -> tuple[ChatCall, dict[str, msgspec.Raw]]:
    raw = msgspec.json.decode(json.dumps(body).encode(), type=dict[str, msgspec.Raw])
    chat = msgspec.json.decode(json.dumps(body).encode(), type=ChatRequest)
    return ChatCall(chat, raw, "req_1"), raw


class _NoStore:
    async def cached(self, *_: object) -> None:
        raise AssertionError("not asked")


def test_a_peer_s_requests_are_never_cached() -> None:
    cache = ResponseCache(_NoStore(), CacheSection(models=["*"]), Metrics())  # type: ignore[arg-type]
    call, raw = _call({"model": "m", "messages": HELLO})
    assert cache.slot(_principal(), "openai.chat", call, raw, False) is not None
    peer = _principal(peer_id="ed25519:abc", limits=Limits(cache=True))
    assert cache.slot(peer, "openai.chat", call, raw, False) is None
    assert cache.slot(_principal(), "openai.chat", call, raw, True) is None  # bypassed


def test_the_digest_is_of_what_changes_the_answer() -> None:
    base = {"model": "m", "messages": HELLO, "temperature": 0}
    digest = canonical_digest("openai.chat", _call(base)[1], False)
    same = {"user": "someone", "metadata": {"a": "b"}, **dict(reversed(base.items()))}
    assert canonical_digest("openai.chat", _call(same)[1], False) == digest
    assert canonical_digest("openai.chat", _call({**base, "seed": 1})[1], False) != digest
    assert canonical_digest("anthropic.messages", _call(base)[1], False) != digest
    assert canonical_digest("openai.chat", _call(base)[1], True) != digest


@pytest.mark.parametrize(
    ("header", "bypassed"),
    [("no-cache", True), ("max-age=0, No-Store", True), ("no-transform", False), ("", False)],
)
def test_cache_control_words(header: str, bypassed: bool) -> None:
    assert header_bypass(header) is bypassed


def test_the_messages_surface_takes_the_bypass_too(cached: Cached) -> None:
    sdk = anthropic.Anthropic(base_url=cached.node.url, api_key=cached.node.key, max_retries=0)

    def message(**extra: Any) -> Any:
        return sdk.messages.with_raw_response.create(
            model="cached-gpt",
            max_tokens=50,
            messages=HELLO,  # type: ignore[arg-type]
            **extra,
        )

    message()
    assert "aihub-cache" not in message(extra_body={"cache": False}).headers
    assert cached.upstream.calls == 2
    assert all("cache" not in body for body in cached.upstream.bodies)
    with pytest.raises(anthropic.BadRequestError):
        message(extra_body={"cache": "maybe"})


def test_hits_are_charged_when_the_config_says_so(node_dir: NodeDir) -> None:
    upstream = Counted()
    with serve_app(upstream) as upstream_url:
        cache_models(node_dir, '["cached-gpt"]')
        node_dir.set_config("bill_hits = false ", "bill_hits = true ")
        node_dir.add_config(priced_model("cached-gpt", upstream_url))
        with run_node(node_dir) as node:
            client = Cached(node, upstream).client()
            miss, hit = ask(client), ask(client)
            assert upstream.calls == 1
            # A hit that is billed needs its budget like any request (this key's answers
            # are its own: no tenant).
            key, record = create_key(node, budget_micros=10**9)
            assert ask(Cached(node, upstream).client(key)).headers["aihub-cache"] == "miss"
            patch_key(node, record["id"], budget_micros=1)
            with pytest.raises(openai.RateLimitError) as refused:
                ask(Cached(node, upstream).client(key))
            assert "budget" in refused.value.message.lower()
    assert hit.headers["aihub-cache"] == "hit"
    assert hit.headers["aihub-cost-micros"] == miss.headers["aihub-cost-micros"] != "0"
    replayed = {r.request_id: r for r in usage_records(node_dir)}[hit.headers["aihub-request-id"]]
    assert replayed.cache_hit and replayed.cost_micros > 0 and replayed.deployment is None


def test_a_kept_answer_is_no_way_around_the_guardrails(node_dir: NodeDir) -> None:
    """Two keys of one tenant share the cache; the one whose profile bans a word is refused
    the answer the other had kept, and the kept answer a profile redacts is redacted."""
    upstream = Counted()
    with serve_app(upstream) as upstream_url:
        cache_models(node_dir, '["cached-gpt"]')
        node_dir.add_config(
            f"""
[[models]]
name = "cached-gpt"
provider = "openai"
base_url = "{upstream_url}/v1"

[guardrails]
keys = {{ guarded = "strict", redacted = "answers" }}

[guardrails.profiles.strict]
checks = [{{ kind = "banned", action = "block", words = ["zeus"], name = "no-zeus" }}]

[guardrails.profiles.answers]
checks = [{{ kind = "pii", action = "redact", input = false, output = true }}]
"""
        )
        with run_node(node_dir) as node:
            tenant = create_tenant(node)["id"]
            free, _ = create_key(node, tenant=tenant, name="free")
            guarded, _ = create_key(node, tenant=tenant, name="guarded")
            redacted, _ = create_key(node, tenant=tenant, name="redacted")
            zeus = [{"role": "user", "content": "write to zeus@example.com"}]

            def asked(key: str, stream: bool = False) -> Any:
                return (
                    Cached(node, upstream)
                    .client(key)
                    .chat.completions.with_raw_response.create(
                        model="cached-gpt", messages=zeus, stream=stream
                    )
                )

            assert asked(free).headers["aihub-cache"] == "miss"
            with pytest.raises(openai.BadRequestError) as refused:
                asked(guarded)
            assert "no-zeus" in refused.value.message
            hit = asked(redacted)
            assert hit.headers["aihub-cache"] == "hit"
            answer = hit.parse().choices[0].message.content or ""
            assert "[EMAIL_ADDRESS_REDACTED]" in answer or "REDACTED" in answer, answer
            assert "zeus@example.com" not in answer
            assert asked(free, stream=True).headers["aihub-cache"] == "miss"
            replay = asked(redacted, stream=True)
            assert replay.headers["aihub-cache"] == "hit"
            text = "".join(c.choices[0].delta.content or "" for c in replay.parse() if c.choices)
            assert "mock says" in text and "zeus@example.com" not in text
            assert upstream.calls == 2


class _HeldStore:
    """A cache store whose writes wait until let go: what a slow disk or a busy database
    is to the request that kept an answer."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.kept: list[bytes] = []

    async def keep(self, answer: Any, now_ms: int, max_entries: int) -> None:
        await self.go.wait()
        self.kept.append(answer.digest)


def test_keeping_an_answer_does_not_wait_for_the_store() -> None:
    """The answer a cache miss got goes to its client while the store writes it: kept in
    this process's memory at once (a hit from here on), in the store once the write is done,
    which the cache waits for when the node stops."""

    async def run() -> None:
        store = _HeldStore()
        cache = ResponseCache(store, CacheSection(models=["*"]), Metrics())  # type: ignore[arg-type]
        slot, kept = CacheSlot("key:k1", b"d1"), Kept(Usage(3, 4))
        keeping = asyncio.ensure_future(cache.keep(slot, kept))
        for _ in range(3):
            await asyncio.sleep(0)
        assert keeping.done() and store.kept == []  # the caller went on; the write waits
        assert await cache.get(slot) == kept  # from memory, meanwhile
        store.go.set()
        await cache.settle()
        assert store.kept == [b"d1"]

    asyncio.run(run())


def test_a_stalled_store_holds_a_bounded_number_of_answers() -> None:
    """While the store does not answer, at most `MAX_WRITES` answers wait to be written; the
    rest are not kept there (memory still has the latest), rather than piling up."""
    from node.gateway.cache import MAX_WRITES

    async def run() -> None:
        store = _HeldStore()
        cache = ResponseCache(store, CacheSection(models=["*"]), Metrics())  # type: ignore[arg-type]
        for n in range(MAX_WRITES + 10):
            await cache.keep(CacheSlot("key:k1", b"d%d" % n), Kept(Usage(3, 4)))
        store.go.set()
        await cache.settle()
        assert store.kept == [b"d%d" % n for n in range(MAX_WRITES)]

    asyncio.run(run())
