"""Managing keys and tenants: the operations behind both the admin API and the CLI.

Every change is written to the store, recorded in the audit log, and announced to every
process serving the node by touching the epoch file (see `node.gateway.auth`); a change
returns once every live process on another host has applied it too, or says which did not
(`unconfirmed`: `node.gateway.propagation`).
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Annotated, TypeVar

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from federation.identity import NodeIdentity
from node.config import IDENTITY_FILE, store_target
from node.errors import HubError, Kind
from node.gateway.auth import touch_epoch
from node.gateway.keys import HASH_PURPOSE, generate_key, hash_key, key_id_of
from node.gateway.policy import Cidr, Glob, Limits, Period, parse_networks, period_end, period_start
from node.gateway.propagation import confirm
from node.storage import open_store
from node.storage.base import Store
from node.storage.records import AuditEvent, Conflict, KeyRecord, SpendRow, TenantRecord, now_ms
from node.units import MAX_DURATION, MAX_MONEY_MICROS, MAX_UNIX

# Every number has an upper bound: the store keeps 64-bit integers, `datetime` stops at the
# year 9999, and a value past either would be accepted here only to fail a later request.
MAX_COUNT = 10**12
Name = Annotated[str, Meta(min_length=1, max_length=128)]
Metadata = Annotated[
    dict[Annotated[str, Meta(min_length=1, max_length=128)], Annotated[str, Meta(max_length=1024)]],
    Meta(max_length=64),
]
Micros = Annotated[int, Meta(ge=0, le=MAX_MONEY_MICROS)]
Count = Annotated[int, Meta(ge=1, le=MAX_COUNT)]
UnixTime = Annotated[int, Meta(ge=1, le=MAX_UNIX)]
Seconds = Annotated[int, Meta(ge=1, le=MAX_DURATION)]


V = TypeVar("V", "KeyView", "TenantView", "CreatedKey")

_CODES = {Kind.NOT_FOUND: "not_found", Kind.CONFLICT: "conflict"}


class ManagementError(HubError):
    """A request to change keys or tenants that cannot be done, and why."""

    def __init__(self, kind: Kind, message: str, param: str | None = None) -> None:
        super().__init__(kind, message, code=_CODES.get(kind), param=param)


def _shown(text: str, limit: int = 80) -> str:
    """What was asked for, quoted, and cut short: an error message echoes no megabyte."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


# --- inputs -------------------------------------------------------------------------------


class LimitsInput(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Limit fields as given: unset keeps the current value, null removes the limit."""

    models: Annotated[list[Glob], Meta(max_length=256)] | UnsetType | None = UNSET
    budget_micros: Micros | UnsetType | None = UNSET
    budget_period: Period | UnsetType = UNSET
    rpm: Count | UnsetType | None = UNSET
    tpm: Count | UnsetType | None = UNSET
    max_parallel: Count | UnsetType | None = UNSET
    # The response cache: true on, false off, null leaves it to the tenant (or the config).
    cache: bool | UnsetType | None = UNSET
    # Interaction logs: true on, false off, null leaves it to the tenant.
    log: bool | UnsetType | None = UNSET

    def apply(self, limits: Limits) -> Limits:
        changes = {
            field: value
            for field in self.__struct_fields__
            if (value := getattr(self, field)) is not UNSET
        }
        return msgspec.structs.replace(limits, **changes)


class KeyInput(LimitsInput, forbid_unknown_fields=True, omit_defaults=True):
    name: Name | UnsetType = UNSET
    tenant: str | UnsetType | None = UNSET
    expires_at: UnixTime | UnsetType | None = UNSET
    expires_in: Seconds | UnsetType = UNSET
    allowed_ips: Annotated[list[Cidr], Meta(max_length=256)] | UnsetType = UNSET
    metadata: Metadata | UnsetType = UNSET


class TenantInput(LimitsInput, forbid_unknown_fields=True, omit_defaults=True):
    name: Name | UnsetType = UNSET
    metadata: Metadata | UnsetType = UNSET


class RotateInput(Struct, forbid_unknown_fields=True):
    grace_seconds: Annotated[int, Meta(ge=0, le=90 * 86400)] = 86400


_LIMIT_FIELDS = LimitsInput.__struct_fields__


def _limits_part(spec: LimitsInput) -> LimitsInput:
    return LimitsInput(**{field: getattr(spec, field) for field in _LIMIT_FIELDS})


# --- views --------------------------------------------------------------------------------


class SpendView(Struct):
    scope: str
    period: Period
    period_start: int
    resets_at: int | None
    cap_micros: int
    spent_micros: int
    reserved_micros: int


class KeyView(Struct, omit_defaults=True):
    id: str
    name: str
    is_admin: bool
    created_at: int
    limits: Limits
    status: str
    tenant_id: str | None = None
    tenant: str | None = None
    allowed_ips: list[str] = []
    metadata: dict[str, str] = {}
    expires_at: int | None = None
    revoked_at: int | None = None
    previous_key_valid_until: int | None = None
    spend: SpendView | None = None
    # After a change: the node's processes that had not applied it when it returned.
    unconfirmed: list[str] = []


class CreatedKey(Struct, omit_defaults=True):
    key: str
    record: KeyView
    unconfirmed: list[str] = []


class TenantView(Struct, omit_defaults=True):
    id: str
    name: str
    created_at: int
    limits: Limits
    keys: int  # always shown: a count of 0 is a value, not an absence
    metadata: dict[str, str] = {}
    spend: SpendView | None = None
    unconfirmed: list[str] = []


def key_status(record: KeyRecord, now: float) -> str:
    if record.revoked_at is not None:
        return "revoked"
    if record.expires_at is not None and record.expires_at <= now:
        return "expired"
    return "active"


def _spend_view(
    scope: str, limits: Limits, rows: dict[tuple[str, int], SpendRow]
) -> SpendView | None:
    if limits.budget_micros is None:
        return None
    start = period_start(limits.budget_period, time.time())
    row = rows.get((scope, start))
    return SpendView(
        scope=scope,
        period=limits.budget_period,
        period_start=start,
        resets_at=period_end(limits.budget_period, start),
        cap_micros=limits.budget_micros,
        spent_micros=row.spent if row else 0,
        reserved_micros=row.reserved if row else 0,
    )


class Management:
    def __init__(self, store: Store, secret: bytes, directory: Path) -> None:
        self.store = store
        self.secret = secret
        self.directory = directory
        # What the last change's wait said of processes that had not applied it.
        self.unconfirmed: list[str] = []

    @classmethod
    async def open(cls, directory: Path) -> Management:
        """For the CLI: the node's store and key secret, straight from its data folder."""
        identity = NodeIdentity.load(directory / IDENTITY_FILE)
        store = await open_store(**store_target(directory)._asdict())
        return cls(store, identity.derive_secret(HASH_PURPOSE), directory)

    async def close(self) -> None:
        await self.store.close()

    async def _changed(
        self, actor: str, action: str, target: str, **detail: str | int | None
    ) -> None:
        event = AuditEvent(now_ms(), action, actor, target, None, detail)
        await self.store.usage.write_batch([], [event])
        touch_epoch(self.directory)
        self.unconfirmed = await confirm(self.store, self.directory)

    def _told(self, view: V) -> V:
        """The view of what was changed, with what the wait said."""
        if not self.unconfirmed:
            return view
        return msgspec.structs.replace(view, unconfirmed=self.unconfirmed)

    # --- keys ------------------------------------------------------------------------------

    async def find_key(self, id_or_key: str) -> KeyRecord:
        """A key by its id, by the key itself (which is never stored, only its id read), or
        by its name when one key has it (names need not be unique: then its id is asked
        for)."""
        key_id = key_id_of(id_or_key) or id_or_key
        record = await self.store.keys.key(key_id)
        if record is not None:
            return record
        named = [k for k in await self.store.keys.keys() if k.name == id_or_key]
        if len(named) == 1:
            return named[0]
        if named:
            ids = ", ".join(k.id for k in named[:5])
            raise ManagementError(
                Kind.CONFLICT,
                f"{len(named)} keys are named {_shown(id_or_key)} ({ids}): give its id",
            )
        raise ManagementError(
            Kind.NOT_FOUND, f"no key {_shown(key_id)} (an id, the key itself, or a key's name)"
        )

    async def _tenant_id(self, tenant: str | None) -> str | None:
        if tenant is None:
            return None
        record = await self.store.keys.tenant(tenant)
        if record is None:
            raise ManagementError(Kind.NOT_FOUND, f"no tenant {_shown(tenant)}", "tenant")
        return record.id

    @staticmethod
    def _check_ips(ips: list[str]) -> None:
        try:
            parse_networks(ips)
        except ValueError as exc:
            raise ManagementError(
                Kind.INVALID_REQUEST, f"allowed_ips: {exc}", "allowed_ips"
            ) from exc

    async def create_key(self, spec: KeyInput, actor: str, *, is_admin: bool = False) -> CreatedKey:
        if spec.name is UNSET:
            raise ManagementError(Kind.INVALID_REQUEST, "a key needs a name", "name")
        allowed_ips = [] if spec.allowed_ips is UNSET else spec.allowed_ips
        self._check_ips(allowed_ips)
        key, key_id = generate_key()
        record = KeyRecord(
            id=key_id,
            name=spec.name,
            hash=hash_key(self.secret, key),
            is_admin=is_admin,
            created_at=int(time.time()),
            tenant_id=await self._tenant_id(None if spec.tenant is UNSET else spec.tenant),
            limits=_limits_part(spec).apply(Limits()),
            allowed_ips=allowed_ips,
            metadata={} if spec.metadata is UNSET else spec.metadata,
            expires_at=_expiry(spec, None),
        )
        await self.store.keys.insert_key(record)
        await self._changed(actor, "key.create", key_id, name=record.name)
        return self._told(CreatedKey(key, await self.key_view(record)))

    async def update_key(self, id_or_key: str, spec: KeyInput, actor: str) -> KeyView:
        record = await self.find_key(id_or_key)
        if record.revoked_at is not None:
            raise ManagementError(Kind.CONFLICT, f"key {record.id} is revoked")
        changes: dict[str, object] = {"limits": _limits_part(spec).apply(record.limits)}
        if spec.name is not UNSET:
            changes["name"] = spec.name
        if spec.tenant is not UNSET:
            changes["tenant_id"] = await self._tenant_id(spec.tenant)
        if spec.allowed_ips is not UNSET:
            self._check_ips(spec.allowed_ips)
            changes["allowed_ips"] = spec.allowed_ips
        if spec.metadata is not UNSET:
            changes["metadata"] = spec.metadata
        changes["expires_at"] = _expiry(spec, record.expires_at)
        updated = msgspec.structs.replace(record, **changes)
        await self.store.keys.save_key(updated)
        fields = ",".join(f for f in spec.__struct_fields__ if getattr(spec, f) is not UNSET)
        await self._changed(actor, "key.update", record.id, fields=fields)
        return self._told(await self.key_view(updated))

    async def revoke_key(self, id_or_key: str, actor: str) -> KeyView:
        record = await self.find_key(id_or_key)
        if record.revoked_at is None and record.is_admin:
            admins = [k for k in await self.store.keys.keys(include_revoked=False) if k.is_admin]
            if len(admins) <= 1:
                # Nothing (not even the CLI) can make another admin key: rotate it instead.
                raise ManagementError(
                    Kind.CONFLICT,
                    f"key {record.id} is the node's last admin key: rotate it instead",
                )
        if record.revoked_at is None:
            record = msgspec.structs.replace(record, revoked_at=int(time.time()))
            await self.store.keys.save_key(record)
            await self._changed(actor, "key.revoke", record.id)
            return self._told(await self.key_view(record))
        return await self.key_view(record)

    async def rotate_key(self, id_or_key: str, grace_seconds: int, actor: str) -> CreatedKey:
        """A new secret for the same key id; the old one keeps working for the grace period."""
        record = await self.find_key(id_or_key)
        if record.revoked_at is not None:
            raise ManagementError(Kind.CONFLICT, f"key {record.id} is revoked")
        key = f"sk-hub-{record.id}_{secrets.token_urlsafe(32)}"
        rotated = msgspec.structs.replace(
            record,
            hash=hash_key(self.secret, key),
            prev_hash=record.hash if grace_seconds else None,
            prev_valid_until=int(time.time()) + grace_seconds if grace_seconds else None,
        )
        await self.store.keys.save_key(rotated)
        await self._changed(actor, "key.rotate", record.id, grace_seconds=grace_seconds)
        return self._told(CreatedKey(key, await self.key_view(rotated)))

    async def key_view(self, record: KeyRecord) -> KeyView:
        tenant = await self.store.keys.tenant(record.tenant_id) if record.tenant_id else None
        scope = f"key:{record.id}"
        start = period_start(record.limits.budget_period, time.time())
        rows = {
            (r.scope, r.period_start): r for r in await self.store.spend.spend([(scope, start)])
        }
        now = time.time()
        grace = record.prev_valid_until
        return KeyView(
            id=record.id,
            name=record.name,
            is_admin=record.is_admin,
            created_at=record.created_at,
            limits=record.limits,
            status=key_status(record, now),
            tenant_id=record.tenant_id,
            tenant=tenant.name if tenant else None,
            allowed_ips=record.allowed_ips,
            metadata=record.metadata,
            expires_at=record.expires_at,
            revoked_at=record.revoked_at,
            previous_key_valid_until=grace if grace and grace > now else None,
            spend=_spend_view(scope, record.limits, rows),
        )

    async def list_keys(self, include_revoked: bool = False) -> list[KeyView]:
        return [
            await self.key_view(record)
            for record in await self.store.keys.keys(include_revoked=include_revoked)
        ]

    # --- tenants ---------------------------------------------------------------------------

    async def find_tenant(self, id_or_name: str) -> TenantRecord:
        record = await self.store.keys.tenant(id_or_name)
        if record is None:
            raise ManagementError(Kind.NOT_FOUND, f"no tenant {_shown(id_or_name)}")
        return record

    async def create_tenant(self, spec: TenantInput, actor: str) -> TenantView:
        if spec.name is UNSET:
            raise ManagementError(Kind.INVALID_REQUEST, "a tenant needs a name", "name")
        if await self.store.keys.tenant(spec.name) is not None:
            raise ManagementError(Kind.CONFLICT, f"a tenant named {spec.name!r} exists", "name")
        record = TenantRecord(
            id="tn_" + secrets.token_hex(6),
            name=spec.name,
            limits=_limits_part(spec).apply(Limits()),
            metadata={} if spec.metadata is UNSET else spec.metadata,
            created_at=int(time.time()),
        )
        try:
            await self.store.keys.insert_tenant(record)
        except Conflict:  # another process took the name since the check above
            raise ManagementError(
                Kind.CONFLICT, f"a tenant named {spec.name!r} exists", "name"
            ) from None
        await self._changed(actor, "tenant.create", record.id, name=record.name)
        return self._told(await self.tenant_view(record))

    async def update_tenant(self, id_or_name: str, spec: TenantInput, actor: str) -> TenantView:
        record = await self.find_tenant(id_or_name)
        changes: dict[str, object] = {"limits": _limits_part(spec).apply(record.limits)}
        if spec.name is not UNSET and spec.name != record.name:
            if await self.store.keys.tenant(spec.name) is not None:
                raise ManagementError(Kind.CONFLICT, f"a tenant named {spec.name!r} exists", "name")
            changes["name"] = spec.name
        if spec.metadata is not UNSET:
            changes["metadata"] = spec.metadata
        updated = msgspec.structs.replace(record, **changes)
        try:
            await self.store.keys.save_tenant(updated)
        except Conflict:
            raise ManagementError(
                Kind.CONFLICT, f"a tenant named {updated.name!r} exists", "name"
            ) from None
        await self._changed(actor, "tenant.update", record.id)
        return self._told(await self.tenant_view(updated))

    async def tenant_view(self, record: TenantRecord) -> TenantView:
        scope = f"tenant:{record.id}"
        start = period_start(record.limits.budget_period, time.time())
        rows = {
            (r.scope, r.period_start): r for r in await self.store.spend.spend([(scope, start)])
        }
        keys = [
            k for k in await self.store.keys.keys(include_revoked=False) if k.tenant_id == record.id
        ]
        return TenantView(
            id=record.id,
            name=record.name,
            created_at=record.created_at,
            limits=record.limits,
            metadata=record.metadata,
            keys=len(keys),
            spend=_spend_view(scope, record.limits, rows),
        )

    async def list_tenants(self) -> list[TenantView]:
        return [await self.tenant_view(record) for record in await self.store.keys.tenants()]


def _expiry(spec: KeyInput, current: int | None) -> int | None:
    if spec.expires_in is not UNSET and spec.expires_at is not UNSET:
        raise ManagementError(
            Kind.INVALID_REQUEST, "give expires_in or expires_at, not both", "expires_in"
        )
    if spec.expires_in is not UNSET:
        return int(time.time()) + spec.expires_in
    if spec.expires_at is not UNSET:
        return spec.expires_at
    return current
