"""The dashboard in a real browser: Playwright driving Debian's Chromium against two real
nodes joined as peers. Sign-in (a wrong key refused), a key created, seen and revoked, a
request seen on the overview's charts, the peer on the peers page, sign-out; no page breaks
its own content security policy. A screenshot of each page is written as a test artefact
(the folder is printed)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Route, expect, sync_playwright

from tests.conftest import RunningNode
from tests.test_federation import LLAMA, cli, invite, make_peer, model_owners, wait_for

CHROMIUM = os.environ.get("AIHUB_CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags Chromium waits on services a closed network lacks.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HI = [{"role": "user", "content": "hi there"}]


@contextmanager
def chromium() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), (
        f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium)"
    )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        try:
            yield browser
        finally:
            browser.close()


def in_a_thread(work: Callable[[], None]) -> None:
    """Playwright's sync API runs an event loop in its thread: the nodes' own set-up (which
    runs `asyncio.run`) stays in this one, the browser goes in another."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(work).result()


@pytest.fixture
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dashboard-screenshots")
    print(f"\ndashboard screenshots: {folder}")
    return folder


class Watched:
    """A page, and what it reported that a person would not see: script errors and
    content security policy violations."""

    def __init__(self, page: Page, base: str, shots: Path) -> None:
        self.page = page
        self.base = base
        self.shots = shots
        self.problems: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.problems.append(f"{message.text} ({message.location.get('url')})")

    def go(self, path: str) -> None:
        self.page.goto(self.base + path)

    def shot(self, name: str) -> None:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        print(f"  {path}")


def sign_in(watched: Watched, key: str) -> None:
    page = watched.page
    watched.go("/ui")
    expect(page).to_have_url(watched.base + "/ui/sign-in")
    page.fill("#key", key)
    page.click("button[type=submit]")


def test_the_dashboard_in_a_browser(tmp_path: Path, shots: Path) -> None:
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    with alice.run() as a, bob.run() as b:
        cli("join", invite(alice, "--cap", "5"), "--data-dir", str(bob.path))
        assert wait_for(lambda: model_owners(b).get("llama3") == "alice", 20)
        # Bob's client asks for a model only alice serves: alice serves bob's node and
        # receipts it; one request of alice's own admin too.
        bob_sdk = openai.OpenAI(base_url=b.url + "/v1", api_key=b.key, max_retries=0)
        bob_sdk.chat.completions.create(model="llama3", messages=HI)
        alice_sdk = openai.OpenAI(base_url=a.url + "/v1", api_key=a.key, max_retries=0)
        alice_sdk.chat.completions.create(model="echo", messages=HI)

        # Bob checks alice's health each second: wait until he has (the page shows it).
        assert wait_for(lambda: _peer_health(b, "alice") is True, 20)
        in_a_thread(lambda: _browse(a, shots))
        in_a_thread(lambda: _browse_peers_of_bob(b, shots))


def _peer_health(node: RunningNode, name: str) -> bool | None:
    with node.client() as admin:
        peers = admin.get("/admin/peers").json()["data"]
    return next((peer["healthy"] for peer in peers if peer["name"] == name), None)


def _browse_peers_of_bob(node: RunningNode, shots: Path) -> None:
    """Bob's side: alice is up, with her advert (llama3, its prices) and no key issued."""
    with chromium() as browser:
        context = browser.new_context(viewport={"width": 1400, "height": 700})
        watched = Watched(context.new_page(), node.url, shots)
        sign_in(watched, node.key)
        watched.go("/ui/peers")
        page = watched.page
        row = page.locator("#peers tr", has=page.locator("td.peer-name", has_text="alice"))
        expect(row.locator(".peer-health")).to_contain_text("up")
        expect(row).to_contain_text("llama3")
        expect(row).to_contain_text("$1 / $1 per 1M")
        watched.shot("peers-of-bob")
        assert watched.problems == []


def _browse(node: RunningNode, shots: Path) -> None:
    with chromium() as browser:
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        watched = Watched(context.new_page(), node.url, shots)
        _sign_in_refuses_a_wrong_key(watched)
        sign_in(watched, node.key)
        expect(watched.page).to_have_url(node.url + "/ui")
        _overview_shows_the_requests(watched)
        _keys_created_seen_and_revoked(watched)
        _tenants_usage_and_audit(watched)
        _peers_page_shows_bob(watched)
        _ledger_page(watched)
        _sign_out(watched)
        assert watched.problems == []


def _sign_in_refuses_a_wrong_key(watched: Watched) -> None:
    sign_in(watched, "sk-hub-000000000000_" + "x" * 43)
    expect(watched.page.locator("#sign-in-error")).to_contain_text("not accepted")
    watched.shot("sign-in-refused")
    # A refused sign-in is a 401 page the browser reports; nothing else may be reported.
    watched.problems = [p for p in watched.problems if "401" not in p]


def _overview_shows_the_requests(watched: Watched) -> None:
    page = watched.page
    for window in ("hour", "day"):
        watched.go(f"/ui?window={window}")
        expect(page.locator("#totals")).to_have_attribute("data-loaded", "true")
        expect(page.locator("#total-requests")).to_have_text("2")
        assert page.locator("#chart-latency canvas").count() == 1
        assert page.locator(".charts .uplot").count() == 4
    watched.shot("overview")


def _keys_created_seen_and_revoked(watched: Watched) -> None:
    page = watched.page
    watched.go("/ui/keys")
    # A change the page's script did not make (no CSRF token) is refused by the admin API,
    # though the browser sends the session cookie with it.
    status = page.evaluate(
        """async () => (await fetch("/admin/keys", {
            method: "POST", headers: {"content-type": "application/json"},
            body: JSON.stringify({name: "forged"})})).status"""
    )
    assert status == 403
    watched.problems = [p for p in watched.problems if "403" not in p]
    page.click("#create-key-panel summary")
    form = page.locator("#create-key")
    form.locator("input[name=name]").fill("browser-made")
    form.locator("input[name=budget_micros]").fill("2.5")
    form.locator("input[name=rpm]").fill("60")
    form.locator("button[type=submit]").click()
    secret = page.locator("#secret-value")
    expect(secret).to_have_text(re.compile(r"^sk-hub-[0-9a-f]{12}_"))
    watched.shot("key-shown-once")
    page.click("#secret-done")
    row = page.locator("#keys tr", has=page.locator("td.key-name", has_text="browser-made"))
    expect(row).to_have_count(1)
    expect(row.locator("meter")).to_have_count(1)
    expect(row).to_contain_text("$2.5")
    watched.shot("keys")
    # Its limits changed in place (PATCH through the admin API): the budget removed.
    row.locator("td.actions summary").click()
    edit = row.locator("td.actions form")
    edit.locator("input[name=rpm]").fill("30")
    edit.locator("input[name=budget_micros]").fill("")
    edit.locator("button[type=submit]").click()
    expect(row.locator("td.limits")).to_contain_text("30 rpm")
    expect(row).to_contain_text("no budget")
    page.once("dialog", lambda dialog: dialog.accept())
    row.locator("button.danger").click()
    expect(row).to_have_count(0)
    watched.go("/ui/keys?revoked=1")
    expect(row.locator(".key-status")).to_have_text("revoked")
    expect(page.locator("#keys")).not_to_contain_text("forged")


def _tenants_usage_and_audit(watched: Watched) -> None:
    page = watched.page
    watched.go("/ui/tenants")
    page.click("details.panel summary")
    page.fill("#create-tenant input[name=name]", "research")
    page.locator("#create-tenant button[type=submit]").click()
    expect(page.locator("#tenants")).to_contain_text("research")
    watched.shot("tenants")
    watched.go("/ui/usage?by=model&since=24h")
    expect(page.locator("#usage")).to_contain_text("llama3")
    expect(page.locator("#usage")).to_contain_text("echo")
    with page.expect_download() as download:
        page.click("#usage-csv")
    path = download.value.path()
    assert path is not None and Path(path).read_text().startswith("group,requests")
    watched.shot("usage")
    watched.go("/ui/audit")
    expect(page.locator("#audit")).to_contain_text("ui.sign_in")
    expect(page.locator("#audit")).to_contain_text("key.revoke")
    watched.shot("audit")
    # No key here opted in to logging: the page says so, under the same CSP.
    watched.go("/ui/logs")
    expect(page.locator("#logs")).to_contain_text("Nothing logged in this period.")
    watched.shot("logs")


def _peers_page_shows_bob(watched: Watched) -> None:
    page = watched.page
    watched.go("/ui/peers")
    row = page.locator("#peers tr", has=page.locator("td.peer-name", has_text="bob"))
    expect(row).to_have_count(1)
    expect(row).to_contain_text("active")
    expect(row).to_contain_text("cap $5")
    watched.shot("peers")


def _ledger_page(watched: Watched) -> None:
    page = watched.page
    watched.go("/ui/ledger")
    expect(page.locator("#balances")).to_contain_text("bob")
    expect(page.locator("#balances")).to_contain_text("they owe us")
    page.click("#verify")
    expect(page.locator("#result-body")).to_contain_text('"ok": true')
    expect(page.locator("#result-summary")).to_have_text(
        "Every chain verified: 1 chain(s), 1 receipt(s)."
    )
    watched.shot("ledger")
    page.locator("#result button").click()


def _sign_out(watched: Watched) -> None:
    page = watched.page
    page.click("#sign-out")
    expect(page).to_have_url(watched.base + "/ui/sign-in")
    watched.go("/ui/keys")
    expect(page).to_have_url(watched.base + "/ui/sign-in")
    watched.shot("signed-out")


def test_the_api_docs_page_works_offline(tmp_path: Path, shots: Path) -> None:
    """Swagger UI renders every operation with every request outside the node refused: its
    assets come from the node itself."""
    alice = make_peer(tmp_path, "alice")
    with alice.run() as node:
        in_a_thread(lambda: _browse_docs(node, shots))


def _browse_docs(node: RunningNode, shots: Path) -> None:
    with chromium() as browser:
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        elsewhere: list[str] = []

        def only_the_node(route: Route) -> None:
            if route.request.url.startswith(node.url):
                route.continue_()
            else:
                elsewhere.append(route.request.url)
                route.abort()

        context.route("**/*", only_the_node)
        watched = Watched(context.new_page(), node.url, shots)
        watched.go("/schema/swagger")
        page = watched.page
        expect(page.locator(".opblock").first).to_be_visible()
        assert page.locator(".opblock").count() >= 40
        expect(page.locator(".swagger-ui .info .title")).to_contain_text("aihub")
        watched.shot("api-docs")
        assert elsewhere == []
        assert watched.problems == []
