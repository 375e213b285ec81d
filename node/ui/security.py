"""What every answer under `/ui` (the dashboard) and `/schema` (the API docs page and its
assets) carries: a strict content security policy (scripts, styles and images from this origin
only, no inline script or style, no framing, forms posting only here) and the headers that keep
a browser from sniffing, leaking referrers or embedding. Both are pages of the node's own
origin, where the dashboard's session lives: a script injected into either could use it."""

from __future__ import annotations

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'"
)

SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=(), payment=()"),
]
_NAMES = {name for name, _ in SECURITY_HEADERS}
UI_PREFIX = "/ui"
# The pages a browser opens: the dashboard, and the API docs (node/observe/docs_page.py).
_PREFIXES = (UI_PREFIX, "/schema")
_UNDER = tuple(prefix + "/" for prefix in _PREFIXES)


def with_security_headers(
    path: str, headers: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """An answer's head as sent: under the dashboard and the docs (pages, their assets,
    redirects and errors alike) the headers above, replacing any of the same name; elsewhere
    as it is. The app's edge (`node/ingress/edge.py`) applies it to every answer."""
    if path not in _PREFIXES and not path.startswith(_UNDER):
        return headers
    kept = [(n, v) for n, v in headers if n.lower() not in _NAMES]
    return [*kept, *SECURITY_HEADERS]
