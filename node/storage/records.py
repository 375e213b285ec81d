"""The records every storage backend reads and writes, and the backend-neutral helpers that
go with them: what the rest of the node hands the store and gets back from it."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from ledger.canonical import b64url
from ledger.receipts import SentRequest

Period = Literal["daily", "weekly", "monthly", "total"]
Glob = Annotated[str, Meta(min_length=1, max_length=256)]


# Stored with each key and tenant (as JSON), hence here; `node.gateway.policy` applies it.
class Limits(Struct, omit_defaults=True, forbid_unknown_fields=True):
    """Limits shared by keys and tenants; None means no limit."""

    models: list[Glob] | None = None
    budget_micros: Annotated[int, Meta(ge=0)] | None = None
    budget_period: Period = "monthly"
    rpm: Annotated[int, Meta(ge=1)] | None = None
    tpm: Annotated[int, Meta(ge=1)] | None = None
    max_parallel: Annotated[int, Meta(ge=1)] | None = None
    # The response cache (`node.gateway.cache`): True on, False off; None leaves it to the
    # tenant, then to the config's `[cache] models`.
    cache: bool | None = None
    # Interaction logs (`node.gateway.interaction_log`): True on, False off; None leaves it
    # to the tenant (off if neither says).
    log: bool | None = None


class TenantRecord(msgspec.Struct):
    id: str
    name: str
    limits: Limits
    metadata: dict[str, str]
    created_at: int


class KeyRecord(msgspec.Struct):
    id: str
    name: str
    hash: bytes
    is_admin: bool
    created_at: int
    tenant_id: str | None = None
    limits: Limits = msgspec.field(default_factory=Limits)
    allowed_ips: list[str] = []
    metadata: dict[str, str] = {}
    expires_at: int | None = None
    revoked_at: int | None = None
    prev_hash: bytes | None = None
    prev_valid_until: int | None = None
    # A cross-node key: only this peer (by its pinned node key) may use it.
    peer_id: str | None = None


class PeerRecord(msgspec.Struct):
    node_id: str
    name: str
    descriptor: str
    # "requested": we asked it to join us and wait; "suspended": it cheated (two receipts for
    # one seq); "revoked_by_peer": it told us, signed, that it revoked our access.
    status: Literal["active", "requested", "revoked", "suspended", "revoked_by_peer"]
    created_at: int
    key_for_them: str | None = None
    # The key the peer issued to us, sealed to our own identity: a leaked database alone
    # does not let anyone spend it.
    key_from_them: str | None = None
    advert: str | None = None
    listed: bool = False
    revoked_at: int | None = None


class InviteRow(msgspec.Struct):
    token_id: str
    public_key: bytes
    exp: int
    uses_left: int
    models: list[str]
    cap_micros: int | None
    cap_period: str
    created_at: int


class UsageRecord(msgspec.Struct):
    request_id: str
    ts_ms: int
    key_id: str | None
    tenant_id: str | None
    model: str
    deployment: str | None
    provider: str | None
    endpoint: str
    stream: bool
    tokens_in: int
    tokens_out: int
    estimated: bool
    cost_micros: int
    latency_ms: int
    status: int
    error: str | None = None
    # What the request cost beyond `cost_micros` (its charge, capped at its reservation).
    unbilled_micros: int = 0
    # The upstream's token counts were out of what the request could have used, and clamped.
    clamped: bool = False
    # Answered from the response cache (`node.gateway.cache`), not by an upstream.
    cache_hit: bool = False
    # The request's interaction log entry (`InteractionLog.request_id`), if it was logged.
    log_id: str | None = None


class Hold(msgspec.Struct, frozen=True):
    """Part of a budget reserved for one request, in one scope and period, by the process
    `holder` (empty: a hold of no process's, as journals written before holders were)."""

    scope: str
    period_start: int
    amount: int
    holder: str = ""


RateKind = Literal["requests", "tokens", "parallel"]


class RateTake(msgspec.Struct, frozen=True):
    """A lease asked of a scope's limit: up to `want` requests of this second (`requests`) or
    parallel slots (`parallel`), at least one, or none at all."""

    scope: str
    kind: RateKind
    limit: int
    want: int


class RateSync(msgspec.Struct):
    """One process's rate-limit bookkeeping, written in one transaction with its takes.

    `returns`: requests leased for a past second and never used, (scope, second, amount);
    `tokens`: tokens used since the last sync, (scope, second, amount);
    `slots`: the parallel slots the process holds now, (scope, slots, in flight), renewed
    until `now + SLOT_TTL` where they are still its own; where they expired (the process could
    not renew them for SLOT_TTL seconds, and others may have taken them) it holds again only
    those of its requests in flight, which run (`RateAnswer.lost`);
    `read`: the scopes whose token counts of the last minute to read back."""

    holder: str
    now: int
    takes: list[RateTake] = []
    returns: list[tuple[str, int, int]] = []
    tokens: list[tuple[str, int, int]] = []
    slots: list[tuple[str, int, int]] = []
    read: list[str] = []


class RateAnswer(msgspec.Struct):
    """`granted[i]` for `takes[i]` (all at least 1, or all 0 when `refused` names the take
    that could not be met), what each scope held before (`used`), per-second counts of the
    last minute (second, amount) for the refused scope and the scopes read, and the scopes
    whose parallel slots the process found it no longer held (`lost`)."""

    granted: list[int]
    used: list[int]
    refused: int | None = None
    buckets: dict[str, list[tuple[int, int]]] = {}
    lost: list[str] = []  # scopes of `RateSync.slots` whose slots had expired


# A live process renews its parallel slots every second; a dead one's come back this long
# after its last renewal.
SLOT_TTL = 15
# What a process holds reserved of a budget is its own until this many seconds pass without
# it renewing them (`SpendStore.renew_holds`); then any process gives it back (`Store.prune`).
HOLD_TTL = 15
# Rate counts older than this many seconds are no longer read (the window is a minute).
RATE_WINDOW = 60


# A process is live while its last heartbeat (`ProcessStore.beat`, each second) is younger
# than this, in the database's clock: a change of keys waits for every live process to
# apply it. A process that stopped without saying so (killed) is waited for no more after it.
PROCESS_FRESH_MS = 15_000
# A process's row is forgotten this long after its last heartbeat.
PROCESS_FORGET_MS = 86_400_000


class ProcessBeat(msgspec.Struct, frozen=True):
    """What a serving process says of itself at each heartbeat. `folder` names its data
    folder (host, device and inode: `path` is only for people), whose `keys.epoch` file the
    process reads on every request; `applied` is the change epoch of keys and tenants it
    checks requests against."""

    holder: str
    host: str
    pid: int
    folder: str
    path: str
    applied: int


class ProcessRecord(msgspec.Struct, frozen=True):
    """A process as the store knows it: its last heartbeat `age_ms` ago (the database's
    clock), and the change epoch it applied."""

    holder: str
    host: str
    pid: int
    folder: str
    path: str
    age_ms: int
    applied: int


class Charge(msgspec.Struct):
    """A finished request: its usage record and what its reservations turn into."""

    record: UsageRecord
    holds: list[Hold] = []
    # A request routed to a peer: what we asked it (what its receipts are checked against).
    sent: SentRequest | None = None


class JoinRequestBounds(msgspec.Struct, frozen=True):
    """How many join requests without an invite may wait (strangers make them): from one
    source address, in all, and for how long (seconds)."""

    source: str
    per_source: int
    total: int
    ttl: int


class AuditEvent(msgspec.Struct):
    ts_ms: int
    action: str
    actor: str | None = None
    target: str | None = None
    ip: str | None = None
    detail: dict[str, str | int | None] = {}


class CachedAnswer(msgspec.Struct):
    """An answer kept by the response cache: under its scope (a tenant's or a key's, never
    shared) and the digest of its canonical request, until `expires_ms`; `answer` is opaque
    to the store (`node.gateway.cache` encodes it)."""

    scope: str
    digest: bytes
    created_ms: int
    expires_ms: int
    answer: bytes


class InteractionLog(msgspec.Struct):
    """One request as it was asked and answered (`node.gateway.interaction_log`): its bodies
    (truncated to a bound, never a header), what served it and what it cost. `findings` is
    the guardrails' JSON list of what they found (stage, check, action, kind and count, never
    the text found)."""

    request_id: str
    ts_ms: int
    key_id: str | None
    tenant_id: str | None
    model: str
    endpoint: str
    deployment: str | None
    peer: str | None
    stream: bool
    status: int
    tokens_in: int
    tokens_out: int
    cost_micros: int
    latency_ms: int
    cache_hit: bool
    error: str | None
    request: bytes
    response: bytes
    findings: bytes = b"[]"
    truncated: bool = False

    @property
    def size(self) -> int:
        return len(self.request) + len(self.response) + len(self.findings)


class LogFilter(msgspec.Struct, frozen=True):
    """Which interaction logs to list: each field given narrows it."""

    key_id: str | None = None
    tenant_id: str | None = None
    model: str | None = None
    status: int | None = None
    since_ms: int = 0
    until_ms: int | None = None
    limit: int = 100


class StoredResponse(msgspec.Struct):
    """A Responses API answer kept for its key: the `response` object, the request's own
    input items, and the conversation so far (every earlier item, then these inputs), all as
    JSON, as the Responses API wrote them."""

    id: str
    key_id: str
    created_ms: int
    response: bytes
    input_items: bytes
    context: bytes


class SpendRow(msgspec.Struct):
    scope: str
    period_start: int
    cap: int
    spent: int
    reserved: int


def settled_scopes(charges: list[Charge]) -> list[tuple[str, int]]:
    """The (scope, period start) pairs whose spend the charges settle, in order."""
    return sorted({(hold.scope, hold.period_start) for c in charges for hold in c.holds})


class UsageGroup(msgspec.Struct):
    group: str | None
    requests: int
    errors: int
    tokens_in: int
    tokens_out: int
    cost_micros: int
    # What requests cost beyond their charge (capped at their reservation), and how many had
    # token counts clamped: an upstream or peer reporting what the request could not use.
    unbilled_micros: int = 0
    clamped: int = 0


class StoredReceipt(msgspec.Struct):
    """A receipt as the ledger table holds it: the signed JSON (`body`, with `sig`, without
    `csig`) and the columns it is found by."""

    provider: str
    consumer: str
    seq: int
    id: str
    hash: str
    amount: int
    iat: int
    body: str
    csig: str | None = None
    csig_sent: int = 0


class LinkedReceipt(msgspec.Struct, frozen=True):
    """A receipt to add to our copy of its chain, with its `prev` (to check the link)."""

    receipt: StoredReceipt
    prev: str


ReceiptMaker = Callable[[int, str | None], StoredReceipt]


class Conflict(Exception):
    """A write that would break a uniqueness rule (a name already taken)."""


class StoreUnavailable(Exception):
    """The database cannot be reached now (a PostgreSQL server gone away, restarting, out of
    connections): nothing was written, and the same call may succeed shortly. The node answers
    its clients 503 meanwhile."""


class Refused(ValueError):
    """The database refuses a record as it is (a value out of range, a broken constraint):
    writing it again will not help."""


class SeriesPoint(msgspec.Struct):
    """One bucket of a usage time series: the requests that finished in it (from `start_ms`
    for the series' bucket length), and their latency percentiles (nearest rank)."""

    start_ms: int
    requests: int
    errors: int
    tokens_in: int
    tokens_out: int
    cost_micros: int
    p50_ms: int | None
    p95_ms: int | None


class SessionRecord(msgspec.Struct):
    """A dashboard sign-in: the hash of its cookie, the admin key it was opened with, the CSRF
    token every change it makes must carry, and when it ends."""

    id_hash: bytes
    key_id: str
    csrf: str
    created_ms: int
    expires_ms: int


def now_ms() -> int:
    return int(time.time() * 1000)


def body_hash(body: str) -> str:
    """A stored receipt's chain hash, from its body (the bytes its provider signed, with
    `sig`, without `csig`): what the next receipt's `prev` must be."""
    return b64url(hashlib.sha256(body.encode()).digest())


class ChainHeads:
    """Where each pair's chain ends while one transaction issues receipts on it, for every
    backend: seeded from the chain's last stored row (seq, body), then moved by each receipt
    issued. The link is the hash of what was signed (the last body), recomputed: a damaged
    `hash` column must not break the chain the consumer checks."""

    def __init__(self) -> None:
        self._heads: dict[tuple[str, str], tuple[int, str | None]] = {}

    def __contains__(self, pair: tuple[str, str]) -> bool:
        return pair in self._heads

    def seed(self, pair: tuple[str, str], last: Sequence[Any] | None) -> None:
        """The chain's last row as stored, (seq, body), or None for an empty chain."""
        self._heads[pair] = (last[0], last[1]) if last else (0, None)

    def issue(self, pair: tuple[str, str], make: ReceiptMaker) -> StoredReceipt:
        """The pair's next receipt, made by `make(seq, prev)`; the chain's head moves to it."""
        seq, last = self._heads[pair]
        receipt = make(seq + 1, body_hash(last) if last is not None else None)
        self._heads[pair] = (seq + 1, receipt.body)
        return receipt
