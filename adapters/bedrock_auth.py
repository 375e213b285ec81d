"""How a Bedrock deployment proves who it is: SigV4 with credentials from the standard AWS chain,
or a Bedrock API key.

The credentials and the region come from botocore's own session, so they are found where every
AWS tool finds them: the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_SESSION_TOKEN`, `AWS_REGION`/`AWS_DEFAULT_REGION`), the shared config and credentials files
(the deployment's `profile`, else `AWS_PROFILE`, else `default`), SSO, assumed roles, a
container's or an instance's role. Resolving them reads files and may call a metadata service,
so it runs in a thread, once, on first use; temporary credentials are refreshed in a thread
too, when botocore says they are about to expire. Requests are signed with botocore's
`SigV4Auth`, never by hand.

A deployment with `api_key_env` uses a Bedrock API key instead (`Authorization: Bearer …`,
what AWS calls `AWS_BEARER_TOKEN_BEDROCK`), and needs no AWS credentials at all.
"""

from __future__ import annotations

import asyncio
import re

import botocore.session
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials, ReadOnlyCredentials, RefreshableCredentials

from adapters.types import UpstreamError

# The name Bedrock's runtime is signed under (its endpoint is `bedrock-runtime`).
SIGNING_NAME = "bedrock"
# `us-east-1`, `eu-central-2`, `us-gov-west-1`, `ap-southeast-5`: it becomes part of a host
# name, so nothing else is taken.
REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-[0-9]{1,2}$")


def _credentials_error(message: str) -> UpstreamError:
    # The node's own setup is wrong: not the client's fault, and no retry mends it.
    return UpstreamError(502, message, code="upstream_credentials")


class _Resolved:
    """What the chain found: the credentials (None: none found) and the region."""

    def __init__(self, credentials: Credentials | None, region: str | None) -> None:
        self.credentials = credentials
        self.region = region


def _resolve(profile: str | None) -> _Resolved:
    """Run botocore's chain (blocking: files, perhaps a metadata service)."""
    try:
        session = botocore.session.Session(profile=profile)
        credentials = session.get_credentials()
        region = session.get_config_variable("region")
    except Exception as exc:  # an unknown profile, a broken config file, a failing provider
        raise _credentials_error(f"bedrock: AWS credentials could not be loaded: {exc}") from exc
    return _Resolved(credentials, region)


def _refresh(credentials: Credentials) -> ReadOnlyCredentials:
    try:
        return credentials.get_frozen_credentials()
    except Exception as exc:  # botocore's refreshers raise whatever their source raised
        raise _credentials_error(f"bedrock: AWS credentials could not be refreshed: {exc}") from exc
        raise _credentials_error(f"bedrock: AWS credentials could not be refreshed: {exc}") from exc


class AwsAuth:
    """One deployment's signer. `region` and `profile` are the deployment's (None: the chain's);
    `api_key` a Bedrock API key, which replaces SigV4 when given."""

    def __init__(self, region: str | None, profile: str | None, api_key: str | None) -> None:
        self._region = region
        self._profile = profile
        self._api_key = api_key
        self._resolved: _Resolved | None = None
        # One resolution or refresh at a time; the others wait for its result.
        self._lock = asyncio.Lock()

    async def region(self) -> str:
        """The region to call and sign for: the deployment's, else the chain's."""
        if self._region is not None:
            return self._region
        resolved = await self._resolution()
        if not resolved.region:
            raise _credentials_error(
                "bedrock: no AWS region: set `region` on the deployment, or AWS_REGION"
            )
        if not REGION.match(resolved.region):
            raise _credentials_error(f"bedrock: {resolved.region!r} is not an AWS region")
        return resolved.region

    async def headers(self, url: str, body: bytes, headers: dict[str, str]) -> dict[str, str]:
        """`headers` with the request's authorisation added: every header given is signed, so
        they must go out exactly as given."""
        if self._api_key:
            return {**headers, "authorization": f"Bearer {self._api_key}"}
        credentials = await self._frozen()
        request = AWSRequest(method="POST", url=url, data=body, headers=headers)
        SigV4Auth(credentials, SIGNING_NAME, await self.region()).add_auth(request)
        return dict(request.headers.items())

    async def _resolution(self) -> _Resolved:
        if self._resolved is None:
            async with self._lock:
                if self._resolved is None:
                    self._resolved = await asyncio.to_thread(_resolve, self._profile)
        return self._resolved

    async def _frozen(self) -> ReadOnlyCredentials:
        credentials = (await self._resolution()).credentials
        if credentials is None:
            # Looked for again on the next request: credentials set up after the node started
            # (a credentials file written, a role attached) are found without a restart.
            self._resolved = None
            raise _credentials_error(
                "bedrock: no AWS credentials found (environment, shared files, SSO, "
                "container or instance role)"
            )
        if isinstance(credentials, RefreshableCredentials) and credentials.refresh_needed():
            # Refreshing calls STS or a metadata service: never on the event loop.
            async with self._lock:
                return await asyncio.to_thread(_refresh, credentials)
        # Static, or temporary and still fresh: no I/O.
        return credentials.get_frozen_credentials()
