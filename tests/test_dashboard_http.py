"""The dashboard over plain HTTP, against a real running node: sign-in and its session cookie,
CSRF on every change made with the cookie, security headers, the admin endpoints the pages
read (usage series, peers), and what a hostile client sends."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Iterator

import httpx
import openai
import pytest

from node.admin.management import CreatedKey, KeyInput, Management
from tests.conftest import NodeDir, RunningNode, run_node

TOKEN = re.compile(r'name="token" value="([^"]+)"')
CSRF = re.compile(r'name="csrf-token" content="([^"]+)"')


@pytest.fixture
def node(node_dir: NodeDir) -> Iterator[RunningNode]:
    with run_node(node_dir) as running:
        yield running


def browser(node: RunningNode) -> httpx.Client:
    """A client that keeps cookies and sends no key: what a browser is to the node."""
    return httpx.Client(base_url=node.url, timeout=30)


def sign_in(client: httpx.Client, key: str) -> httpx.Response:
    form = client.get("/ui/sign-in")
    assert form.status_code == 200
    token = TOKEN.search(form.text)
    assert token
    return client.post("/ui/sign-in", data={"token": token.group(1), "key": key})


def csrf_of(client: httpx.Client) -> str:
    found = CSRF.search(client.get("/ui/keys").text)
    assert found
    return found.group(1)


def audit_actions(node: RunningNode, action: str) -> list[dict]:
    with node.client() as admin:
        answer = admin.get("/admin/audit", params={"action": action})
    assert answer.status_code == 200
    return answer.json()["data"]


def test_pages_need_a_session_and_carry_strict_headers(node: RunningNode) -> None:
    with browser(node) as client:
        for path in ("/", "/admin", "/ui", "/ui/keys", "/ui/ledger", "/ui/audit"):
            answer = client.get(path)
            assert answer.status_code == 303, path
            assert answer.headers["location"] in ("/ui", "/ui/sign-in")
        page = client.get("/ui/sign-in")
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        assert "frame-ancestors 'none'" in policy
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["x-frame-options"] == "DENY"
        assert page.headers["referrer-policy"] == "no-referrer"
        assert "<script>" not in page.text and " style=" not in page.text
        # The assets come from the package, with the same headers: no CDN.
        for asset in ("/ui/static/ui.js", "/ui/static/vendor/uPlot.iife.min.js"):
            served = client.get(asset)
            assert served.status_code == 200, asset
            assert served.headers["content-type"].startswith("text/javascript")
            assert served.headers["x-content-type-options"] == "nosniff"
        assert client.get("/ui/static/../../config.toml").status_code == 404
    # A path Litestar routes only once normalised is the page all the same, and so are its
    # headers: they follow the routed path, not the path as sent.
    host, port = node.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(b"GET //ui/sign-in HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        head = b"".join(iter(lambda: raw.recv(65536), b"")).split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 200") and b"content-security-policy: default-src" in head


def test_a_wrong_key_is_refused_and_audited(node: RunningNode) -> None:
    with browser(node) as client:
        refused = sign_in(client, "sk-hub-000000000000_" + "x" * 43)
        assert refused.status_code == 401
        assert "not accepted" in refused.text
        assert "aihub_session" not in client.cookies
        assert client.get("/ui").status_code == 303
    assert audit_actions(node, "ui.sign_in_failed")


def test_a_key_that_is_not_an_admin_key_cannot_sign_in(node: RunningNode) -> None:
    with node.client() as admin:
        user_key = admin.post("/admin/keys", json={"name": "user"}).json()["key"]
    with browser(node) as client:
        refused = sign_in(client, user_key)
        assert refused.status_code == 403
        assert "aihub_session" not in client.cookies


def test_sign_in_without_the_forms_token_is_refused(node: RunningNode) -> None:
    with browser(node) as client:
        answer = client.post("/ui/sign-in", data={"token": "made-up", "key": node.key})
        assert answer.status_code == 403
        assert "aihub_session" not in client.cookies
    # Another site's form cannot post without the cookie set with ours.
    with httpx.Client(base_url=node.url) as other:
        answer = other.post("/ui/sign-in", data={"token": "", "key": node.key})
        assert answer.status_code == 403


def test_session_cookie_csrf_and_sign_out(node: RunningNode) -> None:
    with browser(node) as client:
        signed_in = sign_in(client, node.key)
        assert signed_in.status_code == 303
        assert signed_in.headers["location"] == "/ui"
        cookie = next(
            value
            for value in signed_in.headers.get_list("set-cookie")
            if value.startswith("aihub_session=")
        )
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert "Max-Age=28800" in cookie and "Path=/" in cookie
        assert node.key not in cookie
        key_id = node.key[len("sk-hub-") : len("sk-hub-") + 12]
        events = audit_actions(node, "ui.sign_in")
        assert [e["actor"] for e in events] == [f"admin:{key_id}"]

        # Reads need no token; a change made with the cookie needs the session's CSRF token.
        assert client.get("/admin/keys").status_code == 200
        without = client.post("/admin/keys", json={"name": "no-token"})
        assert without.status_code == 403
        assert without.json()["error"]["code"] == "csrf_token_invalid"
        wrong = client.post("/admin/keys", json={"name": "bad"}, headers={"x-csrf-token": "x" * 43})
        assert wrong.status_code == 403
        assert client.delete(f"/admin/keys/{key_id}").status_code == 403
        csrf = csrf_of(client)
        made = client.post("/admin/keys", json={"name": "ok"}, headers={"x-csrf-token": csrf})
        assert made.status_code == 201
        names = [k["name"] for k in client.get("/admin/keys").json()["data"]]
        assert "ok" in names and "no-token" not in names and "bad" not in names

        # Signing out needs the token too, and ends the session for every copy of the cookie.
        session = client.cookies["aihub_session"]
        assert client.post("/ui/sign-out", data={"csrf": "wrong"}).status_code == 403
        out = client.post("/ui/sign-out", data={"csrf": csrf})
        assert out.status_code == 303 and out.headers["location"] == "/ui/sign-in"
    with httpx.Client(base_url=node.url, cookies={"aihub_session": session}) as stolen:
        ended = stolen.get("/admin/keys")
        assert ended.status_code == 401
        assert ended.json()["error"]["code"] == "session_expired"
        assert stolen.get("/ui").status_code == 303
    assert audit_actions(node, "ui.sign_out")


def test_revoking_the_admin_key_ends_its_sessions(node: RunningNode) -> None:
    async def second_admin_key() -> CreatedKey:
        management = await Management.open(node.dir.path)
        try:
            return await management.create_key(KeyInput(name="second"), "test", is_admin=True)
        finally:
            await management.close()

    second = asyncio.run(second_admin_key())
    with browser(node) as client:
        assert sign_in(client, second.key).status_code == 303
        assert client.get("/admin/keys").status_code == 200
        with node.client() as admin:
            assert admin.post(f"/admin/keys/{second.record.id}/revoke").status_code == 200
        assert client.get("/admin/keys").status_code == 401
        assert client.get("/ui").status_code == 303


def test_the_bearer_key_needs_no_csrf_token(node: RunningNode) -> None:
    with node.client() as admin:
        assert admin.post("/admin/keys", json={"name": "by-key"}).status_code == 201


def test_usage_series_counts_requests_with_latency_percentiles(node: RunningNode) -> None:
    sdk = openai.OpenAI(base_url=node.url + "/v1", api_key=node.key, max_retries=0)
    for _ in range(3):
        sdk.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}])
    with node.client() as admin:
        for window, buckets in (("hour", 60), ("day", 96), ("week", 84), ("month", 120)):
            series = admin.get("/admin/stats/series", params={"window": window}).json()
            assert len(series["data"]) == buckets
            assert sum(point["requests"] for point in series["data"]) == 3
            busy = [point for point in series["data"] if point["requests"]]
            assert all(p["p50_ms"] is not None and p["p95_ms"] >= p["p50_ms"] for p in busy)
            assert sum(point["tokens_in"] for point in series["data"]) > 0
        bad = admin.get("/admin/stats/series", params={"window": "year" * 100})
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "window"
        assert len(bad.json()["error"]["message"]) < 200
        assert admin.get("/admin/peers").json() == {"object": "list", "data": []}
        peers = admin.get("/admin/usage", params={"by": "peer"})
        assert peers.status_code == 200 and peers.json()["data"] == []
        csv = admin.get("/admin/usage", params={"format": "csv"})
        assert csv.headers["content-type"] == "text/csv; charset=utf-8"
        assert csv.headers["content-disposition"].startswith("attachment")
    with httpx.Client(base_url=node.url) as anonymous:
        assert anonymous.get("/admin/stats/series").status_code == 401


def test_hostile_sign_in_forms(node: RunningNode) -> None:
    with browser(node) as client:
        client.get("/ui/sign-in")
        big = client.post(
            "/ui/sign-in",
            content=b"key=" + b"a" * 100_000,
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert big.status_code == 413
        json_body = client.post("/ui/sign-in", json={"key": node.key})
        assert json_body.status_code == 415
        many = client.post(
            "/ui/sign-in",
            content="&".join(f"f{i}=1" for i in range(50)).encode(),
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert many.status_code == 400
        binary = client.post(
            "/ui/sign-in",
            content=b"key=\xff\xfe",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert binary.status_code == 400
    for cookie in ("", "x" * 5000, "\u00e9t\u00e9", "a" * 43):
        jar = {"aihub_session": cookie} if cookie.isascii() else {}
        with httpx.Client(base_url=node.url, cookies=jar) as forged:
            assert forged.get("/admin/keys").status_code == 401
            assert forged.get("/ui").status_code == 303
            assert forged.post("/ui/sign-out", data={"csrf": "x"}).status_code == 303


def test_the_interaction_logs_pages_show_what_was_asked_escaped(node: RunningNode) -> None:
    from tests.test_admin_api import create_key

    key, _ = create_key(node, log=True)
    prompt = "<script>alert('x')</script> remember 42"
    sdk = openai.OpenAI(base_url=node.url + "/v1", api_key=key, max_retries=0)
    answer = sdk.chat.completions.with_raw_response.create(
        model="echo", messages=[{"role": "user", "content": prompt}]
    )
    request_id = answer.headers["aihub-request-id"]
    with browser(node) as client:
        assert client.get("/ui/logs").status_code == 303  # no session, no logs
        assert sign_in(client, node.key).status_code == 303
        listed = client.get("/ui/logs")
        assert listed.status_code == 200
        assert f'href="/ui/logs/{request_id}"' in listed.text
        shown = client.get(f"/ui/logs/{request_id}")
        assert shown.status_code == 200
        assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; remember 42" in shown.text
        assert "<script>alert" not in shown.text
        assert key not in shown.text and key not in listed.text
        # Filters a person types: a status that is no status is said, never a 500.
        bad = client.get("/ui/logs", params={"status": "abc"})
        assert bad.status_code == 200 and 'id="logs-problem"' in bad.text
        assert request_id not in bad.text
        other = client.get("/ui/logs", params={"model": "not-echo"})
        assert other.status_code == 200 and request_id not in other.text
        missing = client.get("/ui/logs/" + "x" * 500)
        assert missing.status_code == 200 and 'id="log-missing"' in missing.text
