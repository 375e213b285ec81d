"""A request's headers as the hot endpoints read them."""

from __future__ import annotations

from litestar import Request

_HEADERS = "aihub.headers"


def headers_of(request: Request) -> dict[str, str]:
    """The request's headers as a plain dict, made once a request: the first of a repeated
    name wins, as in Litestar's `request.headers`, whose multidict (and the scope state that
    caches it) costs several times as much to build and to ask. Names are lower-cased, as
    that multidict ignores their case (servers send them lower case already)."""
    scope = request.scope
    headers = scope.get(_HEADERS)  # type: ignore[call-overload]
    if headers is None:
        raw = reversed(scope["headers"])
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in raw}
        scope[_HEADERS] = headers  # type: ignore[literal-required]
    return headers
