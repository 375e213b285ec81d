"""The request pipeline on its own, without HTTP: a caller and the adapters' call in, typed
answers, stream items and domain errors out (what every ingress builds on)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import FrameType

import anyio
import msgspec
import pytest

from adapters.types import ChatCall, ChatRequest
from node.config import load_config
from node.errors import HubError, Kind
from node.gateway import pipeline
from node.gateway.auth import Principal
from node.gateway.pipeline import Caller, ReceiptIssued, Signal, StreamEnd, chat_worst_case
from node.hub import Hub
from node.provision import create_node
from node.storage.records import Limits


@contextlib.asynccontextmanager
async def _client_stays() -> AsyncIterator[None]:
    yield


def _call(model: str, stream: bool = False) -> ChatCall:
    body = msgspec.json.encode(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    )
    raw = msgspec.json.decode(body, type=dict[str, msgspec.Raw])
    return ChatCall(msgspec.json.decode(body, type=ChatRequest), raw, "req_pipeline")


async def _served(folder: Path, key: str, model: str, stream: bool) -> object:
    hub = await Hub.start(folder, load_config(folder))
    try:
        principal = await hub.keys.authenticate(f"Bearer {key}", "127.0.0.1")
        caller = Caller(principal, "127.0.0.1", local_only=False)
        call = _call(model, stream)
        admitted = await pipeline.begin(
            hub,
            caller,
            model,
            "chat",
            call.request_id,
            lambda plan: chat_worst_case(call.request, plan),
        )
        if not stream:
            return await pipeline.complete(admitted, lambda r: r.adapter.chat(call), _client_stays)
        streamed = await pipeline.stream(admitted, call, _client_stays)
        items = [item async for item in streamed.items]
        return streamed.facts, items
    finally:
        await hub.stop()


def test_an_answer_is_typed_and_settled(tmp_path: Path) -> None:
    _, key = create_node(tmp_path / "alice", "alice")
    answer = anyio.run(_served, tmp_path / "alice", key, "echo", False)
    assert isinstance(answer, pipeline.Answer)
    assert answer.facts.request_id == "req_pipeline"
    assert answer.facts.cost_micros is not None and answer.facts.receipt is None
    assert answer.result.usage.total_tokens > 0


def test_a_stream_relays_then_ends(tmp_path: Path) -> None:
    _, key = create_node(tmp_path / "alice", "alice")
    facts, items = anyio.run(_served, tmp_path / "alice", key, "echo", True)
    assert facts.request_id == "req_pipeline" and facts.cost_micros is None
    *events, end = items
    assert isinstance(end, StreamEnd)
    assert events and not any(isinstance(event, Signal) for event in events)
    assert not any(isinstance(item, ReceiptIssued) for item in items)  # not a peer's request


def test_an_unknown_model_is_a_domain_error(tmp_path: Path) -> None:
    _, key = create_node(tmp_path / "alice", "alice")
    with pytest.raises(HubError) as refused:
        anyio.run(_served, tmp_path / "alice", key, "no-such-model", False)
    assert refused.value.kind is Kind.NOT_FOUND
    assert (refused.value.code, refused.value.param) == ("model_not_found", "model")


Called = tuple[str, str, str]  # the file and name of a function called, and its caller's name


def _calls_of_a_request(folder: Path, key: str) -> list[Called]:
    """Every Python function called while `begin` and `complete` serve a chat request (the
    second: the first opens the budget's lease), by a key with a budget and each kind of
    rate limit, as the bench's."""
    called: list[Called] = []

    def profiled(frame: FrameType, event: str, _: object) -> None:
        if event == "call" and frame.f_back is not None:
            code = frame.f_code
            called.append((code.co_filename, code.co_name, frame.f_back.f_code.co_name))

    async def served() -> None:
        hub = await Hub.start(folder, load_config(folder))
        try:
            principal = await hub.keys.authenticate(f"Bearer {key}", "127.0.0.1")
            limits = Limits(budget_micros=10**9, rpm=10**6, tpm=10**9, max_parallel=1000)
            budgeted = msgspec.structs.replace(principal.key, limits=limits)
            caller = Caller(Principal(budgeted, principal.tenant), "127.0.0.1", local_only=False)
            for attempt in range(2):
                call = _call("echo")
                sys.setprofile(profiled if attempt else None)
                try:
                    admitted = await pipeline.begin(
                        hub,
                        caller,
                        "echo",
                        "chat",
                        call.request_id,
                        lambda plan, call=call: chat_worst_case(call.request, plan),
                    )
                    await pipeline.complete(
                        admitted, lambda r, call=call: r.adapter.chat(call), _client_stays
                    )
                finally:
                    sys.setprofile(None)
        finally:
            await hub.stop()

    anyio.run(served)
    return called


def test_a_request_enters_no_context_manager_but_the_callers_watch(tmp_path: Path) -> None:
    """`begin` and `complete` settle what escapes them with a plain `try`: the only context
    manager a request enters in the pipeline is the caller's watch for a client gone away
    (each `asynccontextmanager` is a generator and five calls a use)."""
    _, key = create_node(tmp_path / "alice", "alice")
    entered = [
        caller
        for filename, name, caller in _calls_of_a_request(tmp_path / "alice", key)
        if filename == contextlib.__file__ and name == "__aenter__"
    ]
    assert entered == ["_route"]


def test_a_request_runs_no_generator_expression_in_the_gateway(tmp_path: Path) -> None:
    """The highest prices and output limits of the plan, and the budget leases that must
    each hold the reservation, are loops: a `max` or `any` over a generator is a call for
    each route or scope and one more, on every request."""
    _, key = create_node(tmp_path / "alice", "alice")
    gateway = str(Path(pipeline.__file__).parent)
    generators = [
        (Path(filename).name, caller)
        for filename, name, caller in _calls_of_a_request(tmp_path / "alice", key)
        if filename.startswith(gateway) and name == "<genexpr>"
    ]
    assert generators == []


def test_a_request_without_cache_guardrails_or_peer_awaits_none_of_their_hooks(
    tmp_path: Path,
) -> None:
    """A key with no guardrail profile, no cache slot and no peer behind it: the pipeline
    awaits none of the hooks that would have nothing to do (each a coroutine made and run)."""
    _, key = create_node(tmp_path / "alice", "alice")
    hooks = {"_guard_input", "_cached", "_kept_for", "_moderate", "_keep_result", "issue_receipt"}
    awaited = [name for _, name, _ in _calls_of_a_request(tmp_path / "alice", key) if name in hooks]
    assert awaited == []
