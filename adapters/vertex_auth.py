"""Vertex AI's credentials: a service account's OAuth access token, through Google's own
library (google-auth), cached and refreshed before it expires.

google-auth signs the JWT assertion with the account's key and exchanges it at the key's
`token_uri`; its refresh is synchronous (requests), so it runs in a thread, one at a time per
deployment, while every other call keeps using the token it holds. google-auth counts a token
as expired a few minutes before Google does (`REFRESH_THRESHOLD`), so a token in use is never
one about to lapse. Without a key file, Google's Application Default Credentials are used
(`GOOGLE_APPLICATION_CREDENTIALS`, gcloud's login, a Google Cloud machine's metadata server).
"""

from __future__ import annotations

import asyncio
from typing import Any

from adapters.http import ATTEMPT_DEADLINE
from adapters.types import UpstreamError

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
# Seconds for one exchange at the token endpoint (google-auth's own default is 120).
TOKEN_TIMEOUT = 30.0


class _TimedRequest:
    """google-auth's requests transport, with a bound on each call."""

    def __init__(self, timeout: float) -> None:
        from google.auth.transport.requests import Request

        self._request = Request()
        self._timeout = timeout

    def __call__(
        self, url: str, method: str = "GET", body: Any = None, headers: Any = None, **kwargs: Any
    ) -> Any:
        kwargs["timeout"] = min(kwargs.get("timeout") or self._timeout, self._timeout)
        return self._request(url, method, body, headers, **kwargs)


def _load(credentials_file: str | None) -> Any:
    """The credentials, from the key file or Application Default Credentials."""
    import google.auth
    from google.oauth2 import service_account

    if credentials_file is None:
        credentials, _ = google.auth.default(scopes=[SCOPE])
        return credentials
    return service_account.Credentials.from_service_account_file(credentials_file, scopes=[SCOPE])


class AccessTokens:
    """One deployment's access token: fetched on first use, refreshed when google-auth says
    it is about to expire."""

    def __init__(self, credentials_file: str | None, provider: str = "vertex") -> None:
        self._file = credentials_file
        self._provider = provider
        self._credentials: Any = None
        self._request: _TimedRequest | None = None
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        credentials = self._credentials
        if credentials is not None and credentials.valid:
            return credentials.token
        async with self._lock:  # one refresh at a time; the others wait for its token
            if self._credentials is None:
                self._credentials = await self._in_thread(_load, self._file)
            if not self._credentials.valid:
                if self._request is None:
                    self._request = _TimedRequest(TOKEN_TIMEOUT)
                await self._in_thread(self._credentials.refresh, self._request)
            return self._credentials.token

    async def _in_thread(self, work: Any, *args: Any) -> Any:
        from google.auth import exceptions

        deadline = ATTEMPT_DEADLINE.get()
        left = None if deadline is None else deadline - asyncio.get_running_loop().time()
        try:
            # The attempt's deadline bounds the wait for a token as it bounds the call.
            return await asyncio.wait_for(asyncio.to_thread(work, *args), left)
        except TimeoutError as exc:
            raise self._failed(exc, retryable=True) from exc
        except exceptions.TransportError as exc:
            # The token endpoint could not be reached: Google's trouble, worth a retry.
            raise self._failed(exc, retryable=True) from exc
        except exceptions.RefreshError as exc:
            # Refused (a bad key: no retry mends it), unless google-auth says the endpoint's
            # trouble may pass (its 5xx and 429).
            raise self._failed(exc, retryable=bool(getattr(exc, "retryable", False))) from exc
        except (exceptions.GoogleAuthError, ValueError, OSError) as exc:
            # An unreadable or unusable key file: the deployment's fault.
            raise self._failed(exc, retryable=False) from exc

    def _failed(self, exc: BaseException, *, retryable: bool) -> UpstreamError:
        return UpstreamError(
            502,
            f"{self._provider} credentials failed ({type(exc).__name__}: {str(exc)[:300]})",
            code="upstream_credentials",
            retryable=retryable,
        )
