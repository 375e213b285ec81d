"""Signing in and out of the dashboard: plain HTML forms (they work before any script runs).

Sign-in exchanges an admin key for a session (`node.admin.session`); its form carries a
one-off token that must match a cookie set with the form (a double submit), so that no other
site can sign a browser into a session of its choosing. Sign-out carries the session's CSRF
token. Both answer with a redirect (303), so that reloading the next page resends nothing.
"""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import parse_qs

from litestar import Request, Response, get, post
from litestar.datastructures import Cookie
from litestar.response import Redirect

from node.admin.session import (
    SESSION_COOKIE,
    SESSION_SECONDS,
    close_session,
    csrf_matches,
    current_session,
    open_session,
)
from node.errors import HubError
from node.hub import hub_of
from node.ingress.asgi import receive_body
from node.ingress.errors import ApiError
from node.ui.render import page

SIGN_IN_PATH = "/ui/sign-in"
SIGN_IN_COOKIE = "aihub_sign_in"
SIGN_IN_SECONDS = 15 * 60
# A sign-in form holds a key (61 characters) and a token: a few hundred bytes.
MAX_FORM_BYTES = 4096
FORM = "application/x-www-form-urlencoded"


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def form_fields(body: bytes) -> dict[str, str]:
    """A urlencoded form's fields (the first of each name); nothing else is read."""
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ApiError(400, "The form is not urlencoded ASCII") from exc
    try:
        fields = parse_qs(text, max_num_fields=8, strict_parsing=False)
    except ValueError as exc:
        raise ApiError(400, "The form has too many fields") from exc
    return {name: values[0] for name, values in fields.items() if values}


async def read_form(request: Request) -> dict[str, str]:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != FORM:
        raise ApiError(415, f"Send the form as {FORM}", code="unsupported_media_type")
    return form_fields(await receive_body(request, MAX_FORM_BYTES))


def _sign_in_page(request: Request, error: str | None = None, status: int = 200) -> Response:
    token = secrets.token_urlsafe(32)
    response = page(
        "sign_in.html",
        status,
        node=hub_of(request).config.node.name,
        token=token,
        error=error,
    )
    response.set_cookie(
        Cookie(
            key=SIGN_IN_COOKIE,
            value=token,
            path=SIGN_IN_PATH,
            max_age=SIGN_IN_SECONDS,
            httponly=True,
            samesite="strict",
            secure=_secure(request),
        )
    )
    return response


@get(SIGN_IN_PATH, include_in_schema=False)
async def sign_in_form(request: Request) -> Response:
    if await current_session(request) is not None:
        return Redirect("/ui", status_code=303)
    return _sign_in_page(request)


@post(SIGN_IN_PATH, include_in_schema=False, status_code=303)
async def sign_in(request: Request) -> Response:
    fields = await read_form(request)
    expected = request.cookies.get(SIGN_IN_COOKIE, "")
    given = fields.get("token", "")
    if not expected or not hmac.compare_digest(expected.encode(), given.encode()):
        return _sign_in_page(request, "The sign-in form expired: try again.", 403)
    key = fields.get("key", "").strip()
    if not key:
        return _sign_in_page(request, "Enter an admin key.", 400)
    try:
        value, _ = await open_session(request, key)
    except HubError:
        return _sign_in_page(request, "That key was not accepted.", 401)
    except ApiError as exc:
        return _sign_in_page(request, str(exc), exc.status)
    response = Redirect("/ui", status_code=303)
    response.set_cookie(
        Cookie(
            key=SESSION_COOKIE,
            value=value,
            path="/",
            max_age=SESSION_SECONDS,
            httponly=True,
            samesite="strict",
            secure=_secure(request),
        )
    )
    response.delete_cookie(SIGN_IN_COOKIE, path=SIGN_IN_PATH)
    return response


@post("/ui/sign-out", include_in_schema=False, status_code=303)
async def sign_out(request: Request) -> Response:
    found = await current_session(request)
    if found is None:
        return Redirect(SIGN_IN_PATH, status_code=303)
    session, _ = found
    if not csrf_matches(session, (await read_form(request)).get("csrf")):
        raise ApiError(403, "Signing out needs the page's CSRF token", code="csrf_token_invalid")
    await close_session(request, session)
    response = Redirect(SIGN_IN_PATH, status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


SIGN_IN_ROUTES = [sign_in_form, sign_in, sign_out]
