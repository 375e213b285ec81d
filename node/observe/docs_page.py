"""The API docs page (Swagger UI) under the dashboard's content security policy.

Litestar's Swagger page starts Swagger UI with an inline script that holds the whole OpenAPI
document, and styles its body inline: a policy that lets those run lets any injected script
run too, on the node's own origin, beside the dashboard's session. This page holds no script
or style of its own: both are assets served from this node (`swagger/docs-init.js`,
`swagger/docs.css`), and Swagger UI fetches the document from `/schema/openapi.json`, so
`node/ui/security.py` gives it the dashboard's policy (scripts and styles from this origin only).
"""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.openapi.plugins import SwaggerRenderPlugin


class DocsPage(SwaggerRenderPlugin):
    """Swagger UI from this node's assets, started by an asset script, not an inline one."""

    def __init__(self, assets: str) -> None:
        super().__init__(
            js_url=f"{assets}/swagger-ui-bundle.js",
            css_url=f"{assets}/swagger-ui.css",
            standalone_preset_js_url=f"{assets}/swagger-ui-standalone-preset.js",
            favicon=f"<link rel='icon' type='image/png' href='{assets}/favicon-32x32.png'>",
            style=f"<link href='{assets}/docs.css' rel='stylesheet'>",
        )
        self.init_url = f"{assets}/docs-init.js"

    def render(self, request: Request, openapi_schema: dict[str, Any]) -> bytes:
        title = openapi_schema["info"]["title"]
        return (
            "<!DOCTYPE html><html><head>"
            f"<title>{title}</title>{self.favicon}"
            '<meta charset="utf-8"/>'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link href="{self.css_url}" rel="stylesheet">{self.style}'
            f'<script src="{self.js_url}"></script>'
            f'<script src="{self.standalone_preset_js_url}"></script>'
            "</head><body><div id='swagger-container'></div>"
            f'<script src="{self.init_url}"></script>'
            "</body></html>"
        ).encode()
