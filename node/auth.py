"""Who is calling: the one seam every endpoint passes through.

Keys are checked against an in-memory cache of the active key records (no database read on
the request path); the cache is rebuilt whenever keys change.
"""

from __future__ import annotations

import msgspec

from node.errors import ApiError
from node.keys import bearer_token, hashes_match, key_id_of
from node.storage import KeyRecord


class Principal(msgspec.Struct, frozen=True):
    key_id: str
    name: str
    is_admin: bool


def _unauthorised(message: str) -> ApiError:
    return ApiError(
        401,
        message,
        type="authentication_error",
        code="invalid_api_key",
        headers={"www-authenticate": 'Bearer realm="aihub"'},
    )


class KeyCache:
    def __init__(self, secret: bytes, records: list[KeyRecord]) -> None:
        self._secret = secret
        self.replace(records)

    def replace(self, records: list[KeyRecord]) -> None:
        self._records = {record.id: record for record in records if record.revoked_at is None}

    def authenticate(self, authorization: str | None) -> Principal:
        token = bearer_token(authorization)
        if token is None:
            raise _unauthorised("Missing API key: send `Authorization: Bearer sk-hub-…`")
        key_id = key_id_of(token)
        record = self._records.get(key_id) if key_id else None
        if record is None or not hashes_match(record.hash, self._secret, token):
            raise _unauthorised("Incorrect API key provided")
        return Principal(record.id, record.name, record.is_admin)
