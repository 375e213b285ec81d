"""A change to what a peer may use (its key's model list) reaches it at once: the advert gets
a new seq and is pushed, with no restart and no wait for the peer's next health check. Real
nodes on loopback ports, the change made with the real CLI, the effect seen through the
official `openai` SDK."""

from __future__ import annotations

import anyio
import msgspec
import openai
import pytest

from federation.descriptors import make_descriptor
from federation.identity import NodeIdentity
from node.config import CONFIG_FILE, load_config
from node.gateway.epochs import touch_epoch
from node.hub import Hub
from node.peers.peering import admit_peer
from node.provision import create_node
from node.storage.records import Limits
from tests.test_federation import LLAMA, MINI, cli, invite, make_peer, sdk, wait_for

HI = [{"role": "user", "content": "hi"}]


def peer_key_id(issuer_path: str, joiner: str) -> str:
    keys = msgspec.json.decode(cli("keys", "list", "--json", "--data-dir", issuer_path))
    return next(key["id"] for key in keys if key["name"] == f"peer:{joiner}")


def listed(node) -> set[str]:  # type: ignore[no-untyped-def]
    return {model.id for model in sdk(node).models.list()}


def advert_seq(node, of: str) -> int:  # type: ignore[no-untyped-def]
    with node.client() as client:
        peers = client.get("/admin/peers").json()["data"]
    return next(peer["advert"]["seq"] for peer in peers if peer["name"] == of)


def test_a_key_narrowed_and_widened_reaches_the_peer_without_a_restart(tmp_path):
    alice = make_peer(tmp_path, "alice", LLAMA, MINI)
    bob, carol = make_peer(tmp_path, "bob"), make_peer(tmp_path, "carol")
    for peer in (bob, carol):  # their own refresh is an hour away: only a push can tell them
        peer.dir.set_config("health_interval = 1", "health_interval = 3600")
    with alice.run(), bob.run() as b, carol.run() as c:
        cli("join", invite(alice), "--data-dir", str(bob.path))
        cli("join", invite(alice), "--data-dir", str(carol.path))
        assert wait_for(lambda: {"llama3", "gpt-4o-mini"} <= listed(b))
        before = advert_seq(b, "alice")
        key_id = peer_key_id(str(alice.path), "bob")

        cli("keys", "update", key_id, "--models", "llama3", "--data-dir", str(alice.path))
        assert wait_for(lambda: "gpt-4o-mini" not in listed(b))
        assert "llama3" in listed(b)
        assert advert_seq(b, "alice") > before
        with pytest.raises(openai.NotFoundError):  # not offered: refused here, not at alice
            sdk(b).chat.completions.create(model="gpt-4o-mini", messages=HI)
        # Carol's key did not change: she keeps both models, is told the new seq too, and
        # her requests' receipts (priced under it) are taken and countersigned.
        assert wait_for(lambda: advert_seq(c, "alice") > before)
        assert {"llama3", "gpt-4o-mini"} <= listed(c)
        answer = sdk(c).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HI)
        request_id = answer.headers["aihub-request-id"]
        assert wait_for(lambda: countersigned(str(carol.path), request_id))

        cli("keys", "update", key_id, "--models", "none", "--data-dir", str(alice.path))
        assert wait_for(lambda: "gpt-4o-mini" in listed(b))
        assert sdk(b).chat.completions.create(model="gpt-4o-mini", messages=HI).choices


def countersigned(path: str, request_id: str) -> bool:
    exported = msgspec.json.decode(
        cli("ledger", "export", "--format", "json", "--data-dir", path) or "[]"
    )
    return any(r.get("id") == request_id and r.get("csig") for r in exported)


def health(node, of: str) -> tuple[bool | None, int | None]:  # type: ignore[no-untyped-def]
    with node.client() as client:
        peers = client.get("/admin/peers").json()["data"]
    peer = next(peer for peer in peers if peer["name"] == of)
    return peer["healthy"], peer["checked_at"]


def test_a_peer_back_from_a_restart_is_up_at_once_not_after_the_backoff(tmp_path):
    """The advert a peer pushes when it starts again is signed by it: it is up. Its consumer
    marks it so at once instead of at its next check, which backs off from a dead peer."""
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    with bob.run() as b:
        with alice.run():
            cli("join", invite(alice), "--data-dir", str(bob.path))
            assert wait_for(lambda: health(b, "alice")[0] is True)
        assert wait_for(lambda: health(b, "alice")[0] is False)
        # Three more failed checks (2, 4 and 8 s apart): the next is 12 to 20 s away.
        for _ in range(3):
            last = health(b, "alice")[1] or 0
            assert wait_for(lambda last=last: (health(b, "alice")[1] or 0) > last, 15)
        assert health(b, "alice")[0] is False
        with alice.run():
            assert wait_for(lambda: health(b, "alice")[0] is True, 6)
            assert sdk(b).chat.completions.create(model="llama3", messages=HI).choices


def test_a_peer_that_cannot_be_reached_is_checked_and_marked_down_at_once(tmp_path):
    """Bob's own health checks of alice are an hour apart; a request that cannot reach her
    has her checked at once, so she is shown down (and the router knows) within a tick."""
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    bob.dir.set_config("health_interval = 1", "health_interval = 3600")
    with bob.run() as b:
        with alice.run():
            cli("join", invite(alice), "--data-dir", str(bob.path))
            assert wait_for(lambda: "llama3" in listed(b))
        assert health(b, "alice")[0] is not False
        with pytest.raises(openai.APIError) as failed:
            sdk(b).chat.completions.create(model="llama3@alice", messages=HI)
        assert "alice" in str(failed.value) and "could not be reached" in str(failed.value)
        assert wait_for(lambda: health(b, "alice")[0] is False)


def test_a_key_narrowed_before_the_next_tick_after_a_join_is_still_pushed(tmp_path) -> None:
    """A `keys update` may come before the tick that follows a join: what the join told the
    peer is what the update is compared with, so the narrowing is pushed (it was not: the
    peer, first seen at the update, had nothing to compare with). In one process, the tick's
    check (`_offers_changed`) called by hand, where a race put it."""
    folder = tmp_path / "alice"
    create_node(folder, "alice")
    with (folder / CONFIG_FILE).open("a") as config:
        config.write(f"\n{LLAMA}\n\n{MINI}\n")

    async def joined_then_narrowed() -> bool:
        hub = await Hub.start(folder, load_config(folder))
        try:
            peering = hub.peering
            bob = make_descriptor(NodeIdentity.generate(), "bob", ["http://127.0.0.1:9"])
            limits = Limits()
            key = await admit_peer(hub.store, peering.identity, bob, limits, None)
            assert key is not None
            await peering.changed()
            response = peering.join_response(bob.node_id, key, limits)
            assert {"llama3", "gpt-4o-mini"} <= {m["id"] for m in response.advert["models"]}
            # The update, before any tick ran since the join.
            (record,) = [k for k in await hub.store.keys.keys() if k.peer_id == bob.node_id]
            narrowed = msgspec.structs.replace(limits, models=["llama3"])
            await hub.store.keys.save_key(msgspec.structs.replace(record, limits=narrowed))
            touch_epoch(folder)
            return await peering._offers_changed()
        finally:
            await hub.stop()

    assert anyio.run(joined_then_narrowed)
