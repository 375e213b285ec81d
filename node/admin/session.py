"""Dashboard sessions: an admin key exchanged for a cookie, and the admin API's second door.

Signing in with an admin key opens a session kept in the store (`SessionStore`), by the
SHA-256 of a random cookie value: the key itself never reaches the browser's storage, and a
leaked database holds no usable cookie. The cookie is HttpOnly and SameSite=Strict, and ends
with the session (`SESSION_SECONDS`). The admin API accepts the cookie instead of the bearer
key; a change (any method but GET, HEAD and OPTIONS) made with it must also carry the session's
CSRF token in `X-CSRF-Token`, which only a page of ours can read (from its own HTML). The
session names its key: revoking or expiring the key ends every session opened with it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from litestar import Request

from node.errors import HubError, Kind
from node.gateway.auth import Principal
from node.hub import hub_of
from node.ingress.asgi import authenticate, client_ip
from node.ingress.errors import ApiError
from node.observe import access
from node.storage.records import AuditEvent, SessionRecord, now_ms

SESSION_COOKIE = "aihub_session"
CSRF_HEADER = "x-csrf-token"
SESSION_SECONDS = 8 * 3600
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# A cookie value is 43 characters of base64url; anything longer is not one of ours.
MAX_COOKIE = 64


def session_hash(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def session_cookie(request: Request) -> str | None:
    value = request.cookies.get(SESSION_COOKIE)
    return value if value and len(value) <= MAX_COOKIE else None


def _refused(message: str, code: str) -> ApiError:
    return ApiError(403, message, type="permission_error", code=code)


async def open_session(request: Request, key: str) -> tuple[str, SessionRecord]:
    """Exchange an admin key for a new session: (cookie value, session). A key that is not
    an admin key is refused as the admin API refuses it, and audited (`ui.sign_in_failed`,
    bounded like every refused key); a sign-in is audited as `ui.sign_in`."""
    hub = hub_of(request)
    ip = client_ip(request)
    try:
        principal = await hub.keys.authenticate(f"Bearer {key}", ip)
    except HubError:
        hub.keys.note("ui.sign_in_failed", "-", ip)
        raise
    if not principal.is_admin:
        hub.keys.note("ui.sign_in_failed", principal.key_id, ip)
        raise _refused("Signing in needs an admin key", "admin_key_required")
    value = secrets.token_urlsafe(32)
    now = now_ms()
    session = SessionRecord(
        session_hash(value),
        principal.key_id,
        secrets.token_urlsafe(32),
        now,
        now + SESSION_SECONDS * 1000,
    )
    await hub.store.sessions.insert_session(session)
    event = AuditEvent(now, "ui.sign_in", f"admin:{principal.key_id}", principal.key_id, ip)
    await hub.store.usage.write_batch([], [event])
    return value, session


async def close_session(request: Request, session: SessionRecord) -> None:
    hub = hub_of(request)
    await hub.store.sessions.delete_session(session.id_hash)
    actor = f"admin:{session.key_id}"
    event = AuditEvent(now_ms(), "ui.sign_out", actor, session.key_id, client_ip(request))
    await hub.store.usage.write_batch([], [event])


async def current_session(request: Request) -> tuple[SessionRecord, Principal] | None:
    """The request's live session and its admin principal, if its cookie names one whose key
    is still an active admin key that may be used from here."""
    value = session_cookie(request)
    if value is None:
        return None
    hub = hub_of(request)
    session = await hub.store.sessions.session(session_hash(value), now_ms())
    if session is None:
        return None
    principal = await hub.keys.principal_of(session.key_id, client_ip(request))
    if principal is None or not principal.is_admin:
        return None
    return session, principal


def csrf_matches(session: SessionRecord, token: str | None) -> bool:
    return token is not None and hmac.compare_digest(
        session.csrf.encode(), token.encode("utf-8", "surrogatepass")
    )


async def admin_caller(request: Request) -> Principal:
    """Who calls the admin API: the bearer key when there is an `Authorization` header, else
    the session of the cookie (a change with it carrying its CSRF token), else a 401."""
    if "authorization" in request.headers or session_cookie(request) is None:
        principal = await authenticate(request)
        access.note(request.scope, key_id=principal.key_id)
        return principal
    found = await current_session(request)
    if found is None:
        raise HubError(
            Kind.UNAUTHENTICATED,
            "The dashboard session has ended: sign in again",
            code="session_expired",
        )
    session, principal = found
    if request.method not in SAFE_METHODS and not csrf_matches(
        session, request.headers.get(CSRF_HEADER)
    ):
        hub_of(request).keys.note("ui.csrf_refused", principal.key_id, client_ip(request))
        raise _refused(
            "A change made with a dashboard session must carry its CSRF token in X-CSRF-Token",
            "csrf_token_invalid",
        )
    access.note(request.scope, key_id=principal.key_id)
    return principal
