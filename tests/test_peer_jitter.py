"""Health checks (advert fetches) of many peers are spread out, not fired together: one real
node that joined eight real peers, each checked on its own jittered schedule, as the peers'
`checked_at` in its admin API shows; and each peer keeps being checked."""

from __future__ import annotations

from contextlib import ExitStack

from tests.test_federation import cli, invite, make_peer, wait_for

PEERS = 8
INTERVAL = 6


def checked_at(node) -> dict[str, int | None]:  # type: ignore[no-untyped-def]
    with node.client() as client:
        return {p["name"]: p["checked_at"] for p in client.get("/admin/peers").json()["data"]}


def test_health_checks_of_many_peers_do_not_line_up(tmp_path):
    alice = make_peer(tmp_path, "alice")
    alice.dir.set_config("health_interval = 1", f"health_interval = {INTERVAL}")
    others = [make_peer(tmp_path, f"peer{i}") for i in range(PEERS)]
    with ExitStack() as stack:
        for other in others:
            stack.enter_context(other.run())
        for other in others:
            cli("join", invite(other), "--data-dir", str(alice.path))
        a = stack.enter_context(alice.run())
        # Each peer is checked once (its first check falls anywhere in the first interval),
        # then again: the second round's times are as spread as the first's.
        assert wait_for(lambda: all(checked_at(a).values()), 3 * INTERVAL)
        first = checked_at(a)
        assert wait_for(
            lambda: all(t > first[name] for name, t in checked_at(a).items()), 4 * INTERVAL
        )
        times = sorted(checked_at(a).values())
        assert len(set(times)) > 1, f"all {PEERS} peers were checked in the same second: {times}"
