"""A mock of OpenAI's `POST /v1/moderations`, in its real wire format: one result per input
(`flagged`, `categories`, `category_scores`, `category_applied_input_types`) under an id and
the model asked for, and OpenAI's error body for a bad key.

A text is flagged `harassment` if it holds "hate you" and `violence` if it holds "hurt
them". Hostile answers, chosen by a word of any text: `stall` (answers after 30 s), `trickle`
(a byte a second), `huge` (a body of 2 MiB), `garbage` (not JSON), `miscount` (one result
fewer than inputs), `oops` (a 500), `weird` (a category named with markup).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tests.mocks.script import MockScript, read_body

CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
_FLAGS = {"hate you": "harassment", "hurt them": "violence"}


def _result(text: str) -> dict[str, Any]:
    flagged = {category for phrase, category in _FLAGS.items() if phrase in text.lower()}
    return {
        "flagged": bool(flagged),
        "categories": {name: name in flagged for name in CATEGORIES},
        "category_scores": {name: 0.97 if name in flagged else 0.0001 for name in CATEGORIES},
        "category_applied_input_types": {name: ["text"] for name in CATEGORIES},
    }


class ModerationMock:
    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.script = MockScript()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.script.record(scope["path"], headers, body)
        if self.api_key and headers.get("authorization") != f"Bearer {self.api_key}":
            error = {"message": "Incorrect API key provided", "type": "invalid_request_error"}
            return await _send(
                send, 401, json.dumps({"error": error | {"code": "invalid_api_key"}})
            )
        if scope["path"] != "/v1/moderations":
            return await _send(send, 404, json.dumps({"error": {"message": "no such path"}}))
        asked = json.loads(body)
        texts = asked["input"] if isinstance(asked["input"], list) else [asked["input"]]
        words = set(" ".join(texts).split())
        if "stall" in words:
            await asyncio.sleep(30)
        if "trickle" in words:
            return await _trickle(send)
        if "oops" in words:
            return await _send(send, 500, json.dumps({"error": {"message": "server error"}}))
        if "garbage" in words:
            return await _send(send, 200, "<html>not json")
        if "huge" in words:
            return await _send(send, 200, '{"results": [' + '"x",' * (1 << 20) + "]}")
        results = [_result(text) for text in texts]
        if "miscount" in words:
            results = results[:-1]
        if "weird" in words:
            results[0]["categories"]["<b>pwned</b> and more"] = True
        answer = {"id": "modr-mock", "model": asked.get("model", ""), "results": results}
        await _send(send, 200, json.dumps(answer))


async def _send(send: Any, status: int, body: str) -> None:
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body.encode()})


async def _trickle(send: Any) -> None:
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for byte in b'{"results": []}' * 100:
        await send({"type": "http.response.body", "body": bytes([byte]), "more_body": True})
        await asyncio.sleep(1)
    await send({"type": "http.response.body", "body": b""})
