"""One POST on aiohttp's connection pool, a level below `ClientSession.request`.

`ClientSession._request` does per call what the node's calls never need: its redirect loop
(which would also carry a provider key in `x-api-key` or `api-key`, and the body, to another
host on a 307; aiohttp strips only `Authorization`), the cookie jar, trace hooks, proxy and
netrc look-ups, the retry of idempotent methods, the merging of default headers and options.
Measured in-process (`bench/client_cost.py`), that was about a sixth of aiohttp's CPU a call.
This is its path for one request with none of them: the same `ClientRequest`, connector,
protocol and `ClientResponse`, the same timers (`total` over the whole answer, `sock_connect`,
`sock_read`) and the same clean-up, in the same order. It leans on aiohttp below its
documented API (the protocol's `set_response_params`, `ClientResponse.start`,
`TimeoutHandle`, the session's reading limits): the lock pins aiohttp, and the adapter tests
cover every step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp
import yarl
from aiohttp.helpers import TimeoutHandle

_SCHEMES = frozenset({"http", "https"})


async def post(
    session: aiohttp.ClientSession,
    url: yarl.URL,
    body: bytes,
    headers: Mapping[str, str],
    timeouts: aiohttp.ClientTimeout,
) -> aiohttp.ClientResponse:
    """The provider's answer, its head read and its body left to be read (or released);
    never a redirect followed: a 3xx is answered as it came."""
    if url.scheme not in _SCHEMES:
        raise aiohttp.NonHttpUrlClientError(url)
    if not url.raw_host:
        raise aiohttp.InvalidUrlClientError(url)
    if url.raw_user is not None:
        # Credentials in the URL: aiohttp's own path turns them into a BasicAuth header.
        return await session.post(
            url, data=body, headers=headers, timeout=timeouts, allow_redirects=False
        )
    connector = session.connector
    assert connector is not None
    loop = asyncio.get_running_loop()
    # As `_request`: one timer for `total`, cancelling whatever task reads within it.
    total = TimeoutHandle(loop, timeouts.total, ceil_threshold=timeouts.ceil_threshold)
    handle = total.start()
    timer = total.timer()
    response: aiohttp.ClientResponse | None = None
    try:
        with timer:
            request = aiohttp.ClientRequest(
                "POST",
                url,
                headers=headers,
                data=body,
                loop=loop,
                response_class=session._response_class,
                timer=timer,
                session=session,
            )
            try:
                connection = await connector.connect(request, traces=[], timeout=timeouts)
            except TimeoutError as exc:
                raise aiohttp.ConnectionTimeoutError(
                    f"Connection timeout to host {request.url}"
                ) from exc
            assert connection.protocol is not None
            connection.protocol.set_response_params(
                timer=timer,
                read_until_eof=True,
                auto_decompress=session.auto_decompress,
                read_timeout=timeouts.sock_read,
                read_bufsize=session._read_bufsize,
                timeout_ceil_threshold=connector._timeout_ceil_threshold,
                max_line_size=session._max_line_size,
                max_field_size=session._max_field_size,
                max_headers=session._max_headers,
            )
            try:
                response = await request.send(connection)
                try:
                    await response.start(connection)
                except BaseException:
                    response.close()
                    raise
            except BaseException:
                connection.close()
                raise
    except BaseException as exc:
        total.close()
        if handle is not None:
            handle.cancel()
        if isinstance(exc, OSError) and not isinstance(exc, (aiohttp.ClientError, TimeoutError)):
            raise aiohttp.ClientOSError(*exc.args) from exc  # as `_request` has it
        raise
    assert response is not None
    if handle is not None:
        # The total timer lasts as long as the answer is read, and no longer.
        if response.connection is not None:
            response.connection.add_callback(handle.cancel)
        else:
            handle.cancel()
    return response
