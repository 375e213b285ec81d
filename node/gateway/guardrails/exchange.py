"""One bounded exchange with a service a check asks (a webhook, a moderation deployment):
what it answers is untrusted, so its status is checked and its body read to a bound."""

from __future__ import annotations

import httpx

# An answer past this is refused, not read on.
MAX_ANSWER = 1 << 20


class ServiceFailed(Exception):
    """The service answered, but not as asked: a status other than 200 or too large a body."""


async def post_bounded(
    client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str], read_timeout: float
) -> bytes:
    """POST `body` to `url` and return the answer's body, at most MAX_ANSWER bytes.
    `read_timeout` is httpx's (per read): the caller bounds the whole exchange."""
    sent = client.stream("POST", url, content=body, headers=headers, timeout=read_timeout)
    async with sent as answer:
        if answer.status_code != 200:
            raise ServiceFailed(f"status {answer.status_code}")
        chunks, size = [], 0
        async for chunk in answer.aiter_bytes():
            size += len(chunk)
            if size > MAX_ANSWER:
                raise ServiceFailed("answer larger than 1 MiB")
            chunks.append(chunk)
        return b"".join(chunks)
