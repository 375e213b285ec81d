"""Every answer carries `aihub-request-id`, whatever the route and whatever went wrong: a
client can always quote the id of the answer it got."""

from __future__ import annotations

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
