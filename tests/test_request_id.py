"""Every answer carries `aihub-request-id`, whatever the route and whatever went wrong: a
client can always quote the id of the answer it got."""

from __future__ import annotations

import os
import re

import httpx

from node.app import create_app
from tests.conftest import NodeDir, run_node

REQUEST_ID = re.compile(r"req_[0-9a-f]{12}[0-9a-f]{16}")
CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
# A good body where the route takes one; elsewhere an empty body is the good request.
GOOD_BODIES = {
    "/v1/chat/completions": CHAT,
    "/v1/embeddings": {"model": "embed", "input": "hi"},
    "/admin/keys": {"name": "walker"},
    "/admin/tenants": {"name": "walkers"},
    "/admin/ledger/net": {},
}
PATH_PARAMS = re.compile(r"\{[^}:]+:?[^}]*\}")


def _concrete(path: str) -> str:
    return PATH_PARAMS.sub("admin" if path.startswith("/admin/keys") else "echo", path)


def _assert_stamped(answer: httpx.Response, what: str) -> None:
    value = answer.headers.get("aihub-request-id", "")
    assert REQUEST_ID.fullmatch(value), (what, answer.status_code, dict(answer.headers))


def test_every_route_answers_with_a_request_id_good_or_bad(node_dir: NodeDir) -> None:
    node_dir.add_config('[[models]]\nname = "echo"\nprovider = "echo"')
    node_dir.add_config('[[models]]\nname = "embed"\nprovider = "echo"\nkind = "embeddings"')
    routes = [
        (route.path, sorted(route.methods) or ["POST"])
        for route in create_app(node_dir.path).routes
    ]
    admin = {"authorization": f"Bearer {node_dir.key}"}
    statuses: set[int] = set()
    with run_node(node_dir) as node, httpx.Client(base_url=node.url, timeout=30) as client:
        for path, methods in routes:
            url = _concrete(path)
            for method in methods:
                bad = client.request(method, url, content=b"{", headers={"authorization": "x"})
                _assert_stamped(bad, f"bad {method} {url}")
                body = GOOD_BODIES.get(path) if method in ("POST", "PATCH") else None
                good = client.request(method, url, json=body, headers=admin)
                _assert_stamped(good, f"good {method} {url}")
                statuses |= {bad.status_code, good.status_code}
        # What no route handles: an unknown path, a method a route lacks, a body too large,
        # a path parameter of the wrong shape, a stream.
        extra = [
            client.get("/nowhere"),
            client.delete("/health/live"),
            client.put("/v1/chat/completions", headers=admin),
            client.post("/admin/keys", content=b"x" * (5 * 1024 * 1024), headers=admin),
            client.head("/metrics"),
        ]
        for answer in extra:
            _assert_stamped(answer, str(answer.request.url))
            statuses.add(answer.status_code)
        with client.stream(
            "POST", "/v1/chat/completions", json=CHAT | {"stream": True}, headers=admin
        ) as stream:
            _assert_stamped(stream, "stream")
            assert stream.status_code == 200
            stream.read()
    # The walk met successes and every kind of refusal, not one status over and over.
    assert {200, 400, 401, 404, 405, 413} <= statuses, statuses


def test_ids_are_unique_in_a_process_and_never_shared_with_a_forked_child() -> None:
    """The random part is drawn from the OS in bulk (`federation/ids.py`): each slice is
    handed out once, and a child forked with bytes left in its parent's pool draws its own,
    so that the two never name two requests alike."""
    from federation.ids import new_request_id

    ids = [new_request_id() for _ in range(5_000)]  # past one pool's worth (512 ids)
    assert len(set(ids)) == len(ids) and all(REQUEST_ID.fullmatch(i) for i in ids)
    assert len({i[-16:] for i in ids}) == len(ids)
    new_request_id()  # the pool is part-used now: a fork copies what is left of it
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child's side)
        os.close(read)
        os.write(write, "\n".join(new_request_id()[-16:] for _ in range(600)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        theirs = pipe.read().split("\n")
    os.waitpid(child, 0)
    ours = [new_request_id()[-16:] for _ in range(600)]
    assert len(theirs) == 600 and not set(theirs) & set(ours)
