"""Who is calling: the one seam every endpoint passes through.

Keys are checked against an in-memory cache of the key and tenant records (no database read on
the request path). Whoever changes keys (the admin API, the CLI, another worker) touches the
data folder's `keys.epoch` file; every request compares the number it holds (mapped into
memory, no system call: `node/gateway/epochs.py`) and reloads the cache when it moved, so
that a revoked key is refused on the very next request, in every process. Processes on
other hosts (PostgreSQL) hear of a change from the database instead, and the change's command
returns only once each of them has applied it (`node/gateway/propagation.py`).

The cache is trusted only while this process's heartbeat says it is up to date
(`trust_until`): a process cut off from the database, which whoever changes a key stops
waiting for once its heartbeat is stale, checks each request against the store instead (and,
while the store is away, refuses it as unavailable) rather than against keys that may have
been revoked meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import msgspec

from node.errors import HubError, Kind
from node.gateway.epochs import EPOCH_FILE, EpochView
from node.gateway.epochs import read_epoch as read_epoch  # where node/peers imports them from
from node.gateway.epochs import touch_epoch as touch_epoch
from node.gateway.keys import bearer_token, hashes_match, key_id_of
from node.gateway.policy import Network, ip_allowed, parse_networks
from node.gateway.ratelimit import ScopeLimits
from node.storage.base import Store
from node.storage.records import AuditEvent, KeyRecord, Limits, TenantRecord, now_ms

# One audit entry per (event, key or address) per this many seconds: a flood of bad keys
# must not flood the audit log.
AUDIT_QUIET_SECONDS = 10.0
# And at most this many security events in all per quiet period (a stranger chooses the key
# ids and, with many addresses, the addresses): the rest are counted in one
# `audit.suppressed` event.
AUDIT_MAX_PER_PERIOD = 100


class Principal(msgspec.Struct, frozen=True, dict=True):
    """Who calls: the key, and its tenant if it has one. `KeyCache` hands out one principal
    per key until the keys reload, so what is worked out of it here (`cached_property`, kept
    in the `__dict__` that `dict=True` gives) is worked out once, not on every request."""

    key: KeyRecord
    tenant: TenantRecord | None = None

    @cached_property
    def scopes(self) -> tuple[tuple[str, Limits], ...]:
        """The (scope, limits) pairs a request by this principal is charged to
        (`budgets.budget_scopes`): the key, then its tenant."""
        key = (f"key:{self.key.id}", self.key.limits)
        if self.tenant is None:
            return (key,)
        return key, (f"tenant:{self.tenant.id}", self.tenant.limits)

    @cached_property
    def budgeted(self) -> tuple[tuple[str, Limits], ...]:
        """The scopes with a budget (`Budgets.periods`)."""
        return tuple(scope for scope in self.scopes if scope[1].budget_micros is not None)

    @cached_property
    def rate_scopes(self) -> tuple[ScopeLimits, ...]:
        """The scopes with a rate limit, as the limiter admits them (`accounting.rate_scopes`):
        shared by the principal's requests, so read only."""
        return tuple(
            ScopeLimits(scope, limits.rpm, limits.tpm, limits.max_parallel)
            for scope, limits in self.scopes
            if limits.rpm or limits.tpm or limits.max_parallel
        )

    @property
    def key_id(self) -> str:
        return self.key.id

    @property
    def is_admin(self) -> bool:
        return self.key.is_admin


def _unauthorised(message: str) -> HubError:
    return HubError(Kind.UNAUTHENTICATED, message, code="invalid_api_key")


class KeyCache:
    def __init__(
        self,
        secret: bytes,
        store: Store,
        directory: Path,
        audit: Callable[[AuditEvent], None],
    ) -> None:
        self._secret = secret
        self._store = store
        self._epoch_file = EpochView(directory / EPOCH_FILE)  # read on every request
        self._audit = audit
        self._epoch = -1
        # The change epoch of keys and tenants held (`ProcessStore.epoch`), and until when
        # (time.monotonic()) the cache may be used without asking the store.
        self.applied = 0
        self._trusted_until = 0.0
        self._keys: dict[str, KeyRecord] = {}
        self._revoked: set[str] = set()
        self._tenants: dict[str, TenantRecord] = {}
        self._networks: dict[str, list[Network]] = {}
        # One principal per key (and what it works out once), made on the key's first
        # request after each load: a reload (a key revoked, a tenant's limits changed) drops
        # them all, so that the next request is judged by the records as they are now.
        self._principals: dict[str, Principal] = {}
        self._quiet: dict[tuple[str, str], float] = {}
        self._period_start = -AUDIT_QUIET_SECONDS
        self._period_notes = 0
        self._suppressed = 0
        self.listeners: list[Callable[[], None]] = []
        # Which load the cache holds, by the order the loads began (`load`).
        self._loads_begun = 0
        self._load_held = 0

    def mark_stale(self) -> None:
        """Reload on the next request (this process changed keys itself)."""
        self._epoch = -1

    def trust_until(self, deadline: float) -> None:
        """The heartbeat found the cache up to date: use it without asking the store until
        `deadline` (time.monotonic())."""
        self._trusted_until = max(self._trusted_until, deadline)

    def recheck_epoch_file(self) -> None:
        """Map `keys.epoch` anew if the file was replaced (the heartbeat, once a second)."""
        self._epoch_file.remap()

    def _stale(self) -> bool:
        return self._epoch_file.read() != self._epoch or time.monotonic() >= self._trusted_until

    async def load(self) -> None:
        self._loads_begun += 1
        load = self._loads_begun
        epoch = self._epoch_file.read()
        # The change epoch first: the keys read after it hold every change up to it.
        applied = await self._store.processes.epoch()
        keys = await self._store.keys.keys()
        tenants = await self._store.keys.tenants()
        if load < self._load_held:
            # Loads overlap (a change heard of, a heartbeat, a request that found the cache
            # stale): one begun later has been taken already, and this one's reads may be
            # older than its. Taken now, a key revoked in between would serve again, or one
            # made in between be refused, after the change was confirmed as applied.
            return
        self._load_held = load
        self._keys = {k.id: k for k in keys if k.revoked_at is None}
        self._revoked = {k.id for k in keys if k.revoked_at is not None}
        self._tenants = {t.id: t for t in tenants}
        self._networks = {k.id: parse_networks(k.allowed_ips) for k in self._keys.values()}
        self._principals = {}
        self._epoch = epoch
        self.applied = applied
        for listener in self.listeners:
            listener()

    async def authenticate(self, authorization: str | None, ip: str | None) -> Principal:
        if self._stale():
            await self.load()
        token = bearer_token(authorization)
        if token is None:
            raise _unauthorised("Missing API key: send `Authorization: Bearer sk-hub-…`")
        key_id = key_id_of(token)
        record = self._keys.get(key_id) if key_id else None
        now = time.time()
        if record is None or not self._matches(record, token, now):
            action = "auth.revoked_key" if key_id in self._revoked else "auth.unknown_key"
            self.note(action, key_id or "-", ip)
            raise _unauthorised("Incorrect API key provided")
        if record.expires_at is not None and record.expires_at <= now:
            self.note("auth.expired_key", record.id, ip)
            raise _unauthorised("This API key has expired")
        if not ip_allowed(self._networks.get(record.id, []), ip):
            self.note("auth.ip_refused", record.id, ip)
            raise HubError(
                Kind.FORBIDDEN,
                "This API key may not be used from this address",
                code="ip_not_allowed",
            )
        return self._principal(record)

    async def principal_of(self, key_id: str, ip: str | None) -> Principal | None:
        """The principal of a key known by its id alone (a dashboard session names the admin
        key it was opened with): None once the key is revoked, expired, or refused at `ip`."""
        if self._stale():
            await self.load()
        record = self._keys.get(key_id)
        if record is None or (record.expires_at is not None and record.expires_at <= time.time()):
            return None
        if not ip_allowed(self._networks.get(record.id, []), ip):
            return None
        return self._principal(record)

    def _principal(self, record: KeyRecord) -> Principal:
        principal = self._principals.get(record.id)
        if principal is None:
            tenant = self._tenants.get(record.tenant_id) if record.tenant_id else None
            principal = self._principals[record.id] = Principal(record, tenant)
        return principal

    def _matches(self, record: KeyRecord, token: str, now: float) -> bool:
        if hashes_match(record.hash, self._secret, token):
            return True
        # A rotated key's old secret works until its grace period ends.
        return (
            record.prev_hash is not None
            and record.prev_valid_until is not None
            and record.prev_valid_until > now
            and hashes_match(record.prev_hash, self._secret, token)
        )

    def note(
        self,
        action: str,
        target: str,
        ip: str | None,
        detail: dict[str, str | int | None] | None = None,
    ) -> None:
        """Record a security event, at most once per quiet period for the same subject, and
        at most AUDIT_MAX_PER_PERIOD of them in a period."""
        now = time.monotonic()
        if now - self._period_start >= AUDIT_QUIET_SECONDS:
            self._new_period(now)
        # An unknown key's id is whatever the caller made up: its address is the subject.
        who = (ip or "-") if action == "auth.unknown_key" else f"{target}|{ip}"
        subject = (action, who)
        if now - self._quiet.get(subject, -AUDIT_QUIET_SECONDS) < AUDIT_QUIET_SECONDS:
            return
        if self._period_notes >= AUDIT_MAX_PER_PERIOD:
            self._suppressed += 1
            return
        self._period_notes += 1
        if len(self._quiet) > 10_000:
            self._quiet.clear()
        self._quiet[subject] = now
        self._audit(AuditEvent(now_ms(), action, None, target, ip, detail or {}))

    def _new_period(self, now: float) -> None:
        if self._suppressed:
            detail: dict[str, str | int | None] = {"events": self._suppressed}
            self._audit(AuditEvent(now_ms(), "audit.suppressed", None, "-", None, detail))
        self._period_start, self._period_notes, self._suppressed = now, 0, 0
