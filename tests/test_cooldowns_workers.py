"""A deployment put to rest by one worker rests for every worker of the node
(node/gateway/cooldowns.py). Learnt per worker, a failing upstream took each worker's own
failed attempts before all of them let it rest: N times the failures, and N clients paying
the retry delays, for every cooldown."""

from __future__ import annotations

import struct
from contextlib import ExitStack
from pathlib import Path

from node.gateway.cooldowns import COOLDOWNS_FILE, MAX_REST, CooldownBoard, make_board
from tests.conftest import NodeDir, serve_process
from tests.mocks.openai_mock import SERVER_ERROR
from tests.mocks.server import free_port
from tests.procfs import worker_clients
from tests.test_routing import FAST, HELLO, Upstreams, configure

ROUTER = FAST + "\nretries = 0\ncooldown_failures = 2\ncooldown_seconds = 60"


def test_a_deployment_one_worker_rests_is_rested_by_the_others(
    node_dir: NodeDir, tmp_path: Path
) -> None:
    with ExitStack() as stack:
        upstreams = Upstreams(stack, ["p", "s"])
        configure(
            node_dir, ROUTER, [upstreams.deployment("p", "m"), upstreams.deployment("s", "m")]
        )
        upstreams.mocks["p"].script.fail_next(SERVER_ERROR, times=1000)
        port = free_port()
        auth = {"authorization": f"Bearer {node_dir.key}"}
        with serve_process(node_dir.path, port, tmp_path / "serve.log", "--workers", "2") as serve:
            [one], [other] = worker_clients(stack, f"http://127.0.0.1:{port}", serve, port).values()
            body = {"model": "m", "messages": HELLO}

            def served_by(client) -> str:  # type: ignore[no-untyped-def]
                answer = client.post("/v1/chat/completions", json=body, headers=auth)
                assert answer.status_code == 200, answer.text
                return answer.json()["model"]

            # p fails twice on the first worker (each answer comes from s): it rests.
            assert [served_by(one) for _ in range(3)] == ["s"] * 3
            assert upstreams.count("p") == 2
            # The other worker never tried p: it rests there too.
            assert [served_by(other) for _ in range(3)] == ["s"] * 3
            assert upstreams.count("p") == 2
    # A single process has no board (nothing to share with), nor one left from before.
    assert (node_dir.path / COOLDOWNS_FILE).exists()
    with serve_process(node_dir.path, free_port(), tmp_path / "one.log", "--workers", "1"):
        assert not (node_dir.path / COOLDOWNS_FILE).exists()


def test_the_board_bounds_what_its_slots_hold(tmp_path: Path) -> None:
    make_board(tmp_path, 2)
    board = CooldownBoard.open(tmp_path)
    other = CooldownBoard.open(tmp_path)  # another worker's view of the same file
    assert board is not None and other is not None and board.slots == 2
    board.rest(1, 1_000.0 + 30)
    assert other.resting(1, 1_000.0) == 30.0 and other.resting(0, 1_000.0) == 0.0
    board.rest(1, 1_000.0 + 10)  # a shorter rest does not cut a longer one
    assert other.resting(1, 1_000.0) == 30.0
    other.clear(1)
    assert board.resting(1, 1_000.0) == 0.0
    # What a torn write or a hand on the file could leave: never more than MAX_REST.
    for until in (float("nan"), float("inf"), 1e300, -1e300):
        board._view[8:16] = struct.pack("<d", until)
        assert 0.0 <= other.resting(1, 1_000.0) <= MAX_REST
    assert other.resting(7, 1_000.0) == 0.0 and other.resting(-1, 1_000.0) == 0.0
    other.rest(7, 2_000.0)  # a slot past the file's end (a deployment added since): ignored
    assert CooldownBoard.open(tmp_path / "none") is None
