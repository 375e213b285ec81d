"""The OpenAPI document tells the truth: a test that walks it. Every route the node serves is
in it, with its bodies, errors and security; every schema is valid JSON Schema and every
`$ref` resolves; the answers a real node gives validate against the schemas the document
names for them; the docs page loads its assets from the node; a 405 carries `Allow`."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from jsonschema import Draft202012Validator
from litestar.routes import HTTPRoute

from node.app import create_app
from node.ui.security import CONTENT_SECURITY_POLICY
from tests.conftest import NodeDir, RunningNode, run_node

METHODS = ("get", "post", "patch", "delete", "put")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    from node.provision import create_node

    folder = tmp_path_factory.mktemp("openapi") / "node"
    _, key = create_node(folder, "documented")
    with run_node(NodeDir(folder, key)) as running:
        yield running


@pytest.fixture(scope="module")
def spec(node: RunningNode) -> dict[str, Any]:
    answer = httpx.get(node.url + "/schema/openapi.json")
    assert answer.status_code == 200
    return answer.json()


def operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method in METHODS:
            if method in item:
                yield method, path, item[method]


def resolve(spec: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    target: Any = spec
    for part in ref[2:].split("/"):
        target = target[part]
    return target


def refs_in(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, inner in value.items():
            if key == "$ref" and isinstance(inner, str):
                yield inner
            else:
                yield from refs_in(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from refs_in(inner)


def validator(spec: dict[str, Any], schema: dict[str, Any]) -> Draft202012Validator:
    """A validator for one schema of the document, its `$ref`s resolved in the document."""
    return Draft202012Validator({**schema, "components": spec["components"]})


def answer_schema(spec: dict[str, Any], method: str, path: str, status: int) -> dict[str, Any]:
    responses = spec["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method} {path} does not document {status}"
    return responses[str(status)]["content"]["application/json"]["schema"]


def test_every_route_is_documented(spec: dict[str, Any], node: RunningNode) -> None:
    app = create_app(node.dir.path)
    documented = {(m, p) for m, p, _ in operations(spec)}
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler in route.route_handlers:
            # Only what is not API says so itself: the dashboard, the docs page, redirects.
            if not handler.resolve_include_in_schema():
                continue
            for method in handler.http_methods:
                if method.lower() in METHODS:
                    where = (method.lower(), route.path_format)
                    assert where in documented, f"{method} {route.path_format} is not documented"
    # The bare ASGI endpoints too (Litestar lists them as ASGI routes).
    for path in ("/v1/chat/completions", "/v1/embeddings", "/v1/messages", "/v1/responses"):
        assert ("post", path) in documented


def test_every_operation_has_bodies_errors_and_security(spec: dict[str, Any]) -> None:
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schemes["bearer"]["description"],
    }
    for method, path, operation in operations(spec):
        where = f"{method.upper()} {path}"
        assert operation.get("summary"), where
        success = [s for s in operation["responses"] if s.startswith("2")]
        assert success, where
        for status in success:
            content = operation["responses"][status].get("content")
            assert content, f"{where} {status} says nothing of its body"
            for media in content.values():
                assert media["schema"], f"{where} {status}: an empty schema"
        shapes = {"ErrorBody", "AnthropicError"}
        if path == "/health/ready":
            shapes.add("Health")  # unready is a 503 with the same body
        for status, response in operation["responses"].items():
            if status.startswith(("4", "5")):
                ref = response["content"]["application/json"]["schema"]["$ref"]
                assert ref.rsplit("/", 1)[1] in shapes, where
        changes = method in ("post", "patch") and not path.endswith("/revoke")
        if changes and path.startswith(("/admin/keys", "/admin/tenants")):
            assert "requestBody" in operation, where
        assert "security" in operation, where
        for requirement in operation["security"]:
            for name in requirement:
                assert name in schemes, where
        if path.startswith("/admin/"):
            assert {"bearer": []} in operation["security"], where
            assert "401" in operation["responses"] and "403" in operation["responses"], where
    # Admin bodies are the real ones: a key's budget is named and bounded.
    key_input = spec["components"]["schemas"]["KeyInput"]
    budget = key_input["properties"]["budget_micros"]["anyOf"][0]
    assert budget == {"type": "integer", "minimum": 0, "maximum": budget["maximum"]}
    chat = resolve(spec, answer_schema(spec, "post", "/v1/chat/completions", 200)["$ref"])
    assert {"id", "choices", "model"} <= set(chat["properties"])


def test_every_schema_is_valid_and_every_ref_resolves(spec: dict[str, Any]) -> None:
    for schema in spec["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)  # raises, naming what is wrong
    for ref in set(refs_in(spec)):
        assert resolve(spec, ref) is not None, ref


def _check(spec: dict[str, Any], method: str, path: str, answer: httpx.Response) -> None:
    schema = answer_schema(spec, method, path, answer.status_code)
    errors = list(validator(spec, schema).iter_errors(answer.json()))
    assert not errors, f"{method} {path}: {errors[0].message} at {list(errors[0].path)}"


def test_real_answers_match_their_schemas(spec: dict[str, Any], node: RunningNode) -> None:
    sdk = openai.OpenAI(base_url=node.url + "/v1", api_key=node.key, max_retries=0)
    chat = sdk.chat.completions.with_raw_response.create(
        model="echo", messages=[{"role": "user", "content": "hi"}]
    )
    with node.client() as client:
        _check(
            spec,
            "post",
            "/v1/chat/completions",
            client.post(
                "/v1/chat/completions",
                json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]},
            ),
        )
        assert chat.http_response.status_code == 200
        _check(
            spec,
            "post",
            "/v1/embeddings",
            client.post("/v1/embeddings", json={"model": "echo-embed", "input": "hi"}),
        )
        _check(spec, "get", "/v1/models", client.get("/v1/models"))
        _check(spec, "get", "/v1/models/{model_id}", client.get("/v1/models/echo"))
        created = client.post(
            "/admin/keys", json={"name": "documented", "budget_micros": 5_000_000, "rpm": 10}
        )
        _check(spec, "post", "/admin/keys", created)
        key_id = created.json()["record"]["id"]
        _check(
            spec,
            "patch",
            "/admin/keys/{id_or_key}",
            client.patch(f"/admin/keys/{key_id}", json={"budget_micros": None}),
        )
        _check(
            spec,
            "post",
            "/admin/keys/{id_or_key}/rotate",
            client.post(f"/admin/keys/{key_id}/rotate", json={"grace_seconds": 0}),
        )
        _check(
            spec,
            "post",
            "/admin/keys/{id_or_key}/revoke",
            client.post(f"/admin/keys/{key_id}/revoke"),
        )
        _check(spec, "post", "/admin/tenants", client.post("/admin/tenants", json={"name": "t"}))
        for path in (
            "/admin/keys",
            "/admin/tenants",
            "/admin/usage",
            "/admin/audit",
            "/admin/peers",
            "/admin/stats/series",
            "/admin/ledger/balance",
            "/admin/ledger/verify",
            "/admin/ledger/statements",
        ):
            _check(spec, "get", path, client.get(path))
        _check(spec, "post", "/admin/ledger/net", client.post("/admin/ledger/net", json={}))
        # Errors are what the document says they are.
        _check(spec, "get", "/admin/keys/{id_or_key}", client.get("/admin/keys/nope"))
        _check(spec, "post", "/admin/keys", client.post("/admin/keys", json={"rpm": "fast"}))
    with httpx.Client(base_url=node.url) as anonymous:
        _check(spec, "get", "/admin/keys", anonymous.get("/admin/keys"))
        _check(spec, "get", "/health/live", anonymous.get("/health/live"))
        _check(spec, "get", "/health/ready", anonymous.get("/health/ready"))
        _check(
            spec,
            "post",
            "/v1/messages",
            anonymous.post("/v1/messages", json={"model": "echo", "max_tokens": 5, "messages": []}),
        )


def test_docs_page_loads_from_the_node(node: RunningNode) -> None:
    with httpx.Client(base_url=node.url) as client:
        page = client.get("/schema/swagger")
        assert page.status_code == 200
        assert "https://" not in page.text and "http://" not in page.text
        for asset in (
            "swagger-ui-bundle.js",
            "swagger-ui-standalone-preset.js",
            "swagger-ui.css",
            "favicon-32x32.png",
        ):
            assert f"/schema/assets/{asset}" in page.text
            assert client.get(f"/schema/assets/{asset}").status_code == 200
        assert client.get("/schema").status_code == 200


def test_docs_page_runs_under_the_dashboards_policy(node: RunningNode) -> None:
    """The docs page is on the node's own origin, beside the dashboard's session: it carries
    the dashboard's content security policy, and needs nothing that policy refuses (no inline
    script or style; Swagger UI is started by an asset and fetches the document itself)."""
    with httpx.Client(base_url=node.url) as client:
        for path in ("/schema", "/schema/swagger", "/schema/assets/docs-init.js"):
            answer = client.get(path)
            assert answer.status_code == 200, path
            assert answer.headers["content-security-policy"] == CONTENT_SECURITY_POLICY, path
            assert answer.headers["x-frame-options"] == "DENY", path
        page = client.get("/schema/swagger").text
        scripts = re.findall(r"<script([^>]*)>(.*?)</script>", page, re.S)
        assert scripts and all("src=" in attrs and not body.strip() for attrs, body in scripts)
        assert "<style" not in page and " style=" not in page
        assert "/schema/openapi.json" in client.get("/schema/assets/docs-init.js").text
        assert client.get("/schema/openapi.json").json()["info"]["title"] == "aihub"
        # The answers of the API itself are not pages: no policy of the dashboard's there.
        assert "content-security-policy" not in client.get("/health/live").headers


def test_a_405_names_the_methods_allowed(node: RunningNode) -> None:
    with node.client() as client:
        for method, path, allowed in (
            ("GET", "/v1/chat/completions", {"POST"}),
            ("PUT", "/admin/keys", {"GET", "POST"}),
            ("POST", "/health/live", {"GET"}),
            ("DELETE", "/v1/messages", {"POST"}),
        ):
            answer = client.request(method, path)
            assert answer.status_code == 405, (method, path)
            assert allowed <= {m.strip() for m in answer.headers["allow"].split(",")}
