"""What a storage backend offers: one `Protocol` per aggregate, and the `Store` that holds one
of each (`store.keys`, `store.spend`, `store.usage`, `store.peers`, `store.ledger`,
`store.audit`, `store.responses`, `store.sessions`). The node is written against these;
`sqlite/` implements them, and another
backend (PostgreSQL, for several gateway processes of one node) would sit beside it.

Unless a method says otherwise, a write is atomic (all of it, or none) and safe against every
other process that serves the same node.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, Protocol

from ledger.receipts import SentRequest
from node.storage.records import (
    AuditEvent,
    CachedAnswer,
    Charge,
    InteractionLog,
    InviteRow,
    JoinRequestBounds,
    KeyRecord,
    LinkedReceipt,
    LogFilter,
    PeerRecord,
    ProcessBeat,
    ProcessRecord,
    RateAnswer,
    RateSync,
    ReceiptMaker,
    SeriesPoint,
    SessionRecord,
    SpendRow,
    StoredReceipt,
    StoredResponse,
    TenantRecord,
    UsageGroup,
    UsageRecord,
)


class KeyStore(Protocol):
    """API keys (a cross-node key names its peer) and the tenants they belong to."""

    async def insert_key(self, key: KeyRecord) -> None: ...

    async def save_key(self, key: KeyRecord) -> None:
        """Write every mutable field of an existing key."""
        ...

    async def keys(self, *, include_revoked: bool = True) -> list[KeyRecord]:
        """Oldest first."""
        ...

    async def key(self, key_id: str) -> KeyRecord | None: ...

    async def active_keys(self) -> list[KeyRecord]: ...

    async def insert_tenant(self, tenant: TenantRecord) -> None:
        """Raises `records.Conflict` if the name is taken."""
        ...

    async def save_tenant(self, tenant: TenantRecord) -> None:
        """Raises `records.Conflict` if the (new) name is taken."""
        ...

    async def tenants(self) -> list[TenantRecord]:
        """By name."""
        ...

    async def tenant(self, id_or_name: str) -> TenantRecord | None: ...


class SpendStore(Protocol):
    """Budgets and leases: spend and reservations per (scope, period start), alert claims, and
    the rate counts and parallel slots every process of the node shares."""

    async def open_periods(self, rows: list[tuple[str, int, int]]) -> None:
        """Make sure each (scope, period start, cap) row exists and carries the current cap."""
        ...

    async def reserve(self, amount: int, scopes: list[tuple[str, int]], holder: str = "") -> bool:
        """Reserve `amount` in every (scope, period start), or in none if any would pass its
        cap: atomic against every other reservation, so that concurrent requests can never
        take a budget past its cap. A `holder` (a process) holds it until it releases or
        settles it, or stops renewing its holds (`renew_holds`) for `HOLD_TTL` seconds."""
        ...

    async def release(self, leases: list[tuple[int, tuple[str, int]]], holder: str = "") -> None:
        """Give back reserved budget that no request will use: (amount, (scope, start)). A
        holder gives back at most what its hold still has: what was given back for it
        already (it could not renew in time) is not given back twice."""
        ...

    async def renew_holds(self, holder: str, now: int) -> set[tuple[str, int]]:
        """The holder is alive: what it holds stays its own for `HOLD_TTL` seconds more
        (from `now`; PostgreSQL counts in the database's own clock, which every host shares);
        the (scope, period start) of every hold it still has. A hold missing was given back
        (it could not renew in time): its lease is reserved no more."""
        ...

    async def release_all_reservations(self) -> None:
        """At start-up no request is in flight: what is still reserved was lost in a crash."""
        ...

    async def spend(self, scopes: list[tuple[str, int]]) -> list[SpendRow]: ...

    async def claim_alert(self, scope: str, period_start: int, threshold: int) -> bool:
        """True the first time a threshold is reached in a period, False ever after."""
        ...

    async def rate_sync(self, sync: RateSync) -> RateAnswer:
        """Apply one process's rate-limit bookkeeping and grant its takes, in one
        transaction: every take gets at least one, or none does. On the request path."""
        ...

    async def release_slots(self, holder: str) -> None:
        """A process stops: the parallel slots it held come back at once."""
        ...


class UsageStore(Protocol):
    """Finished requests (what the journal drains into)."""

    async def write_batch(self, charges: list[Charge], events: list[AuditEvent]) -> list[SpendRow]:
        """Usage records, the spend their holds settle, the requests they routed to peers,
        and audit events: one transaction. Idempotent per request id: a charge written
        again (a journal replayed after a crash) is skipped together with its spend. The
        spend rows of the scopes the charges hold, as the transaction left them: the budget
        alerts read them there, where a read of their own was a transaction per batch."""
        ...

    async def usage_since(self, since_ms: int = 0) -> list[UsageRecord]:
        """Oldest first."""
        ...

    async def usage_report(
        self, by: Literal["key", "tenant", "model", "peer"], since_ms: int
    ) -> list[UsageGroup]:
        """Totals per key, tenant or model, or per peer for the requests we routed to peers
        (by node id), costliest first."""
        ...

    async def usage_series(self, since_ms: int, bucket_ms: int) -> list[SeriesPoint]:
        """The requests finished since `since_ms` in buckets of `bucket_ms` (the n-th from
        `since_ms + n * bucket_ms`), oldest first, only the buckets that have any; each with
        its latency p50 and p95 (nearest rank)."""
        ...


class PeerStore(Protocol):
    """The nodes we peer with, the invites and join requests that make peers, their health,
    the nonces their signed requests carried, and node-wide counters."""

    async def insert_invite(self, invite: InviteRow) -> None: ...

    async def invite(self, token_id: str) -> InviteRow | None: ...

    async def accept_join(
        self, token_id: str | None, now: int, key: KeyRecord, peer: PeerRecord
    ) -> bool:
        """Spend one use of an invite (if any), issue the peer's key (revoking the one it had)
        and record the peer, in one transaction: a used-up or expired invite changes
        nothing and answers False."""
        ...

    async def save_peer(self, peer: PeerRecord) -> None:
        """Insert or update; None in a key or advert field keeps the one stored."""
        ...

    async def peers(self, *, include_revoked: bool = False) -> list[PeerRecord]: ...

    async def peer(self, node_id: str) -> PeerRecord | None: ...

    async def revoke_peer(self, node_id: str, now: int, status: str = "revoked") -> None:
        """Cut a peer off: its status and the key we issued to it, in one transaction."""
        ...

    async def add_join_request(
        self, node_id: str, descriptor: str, now: int, bounds: JoinRequestBounds
    ) -> Literal["source", "total"] | None:
        """Keep a join request (asking again refreshes its descriptor, not its age); None, or
        which bound refused it. Atomic: two processes cannot both take the last place."""
        ...

    async def join_requests(self) -> list[tuple[str, str, int]]:
        """(node id, descriptor, received at), oldest first."""
        ...

    async def join_request(self, node_id: str) -> str | None:
        """The descriptor a pending join request came with."""
        ...

    async def save_join_answer(self, node_id: str, answer: str, now: int) -> None: ...

    async def join_answer(self, node_id: str) -> str | None: ...

    async def save_peer_health(
        self, node_id: str, healthy: bool, latency_ms: int | None, now: int
    ) -> None: ...

    async def peer_health(self) -> dict[str, tuple[bool, int | None, int]]: ...

    async def next_counter(self, name: str, floor: int = 1) -> int:
        """Atomically move a node-wide counter (e.g. the advert seq) past its last value, and
        to at least `floor`, and return it: strictly above every value it returned before,
        in any process and across restarts."""
        ...

    async def counter(self, name: str) -> int:
        """A node-wide counter's last value (`next_counter`), 0 if it was never moved."""
        ...

    async def claim_turn(self, name: str, turn: int) -> bool:
        """True for the one caller, of every process of the node, that first claims `turn`
        (a number that grows: a slot of the clock) of the node-wide job `name`; False for a
        turn claimed already, or one before the last claimed."""
        ...

    async def claim_nonce(self, pair: bytes, expires: int, now: int) -> bool:
        """Record `pair` as used until `expires`: True if it is new, False if it is recorded
        and not expired (a replay). Atomic across processes. On the request path."""
        ...

    async def claim_nonces(self, claims: Sequence[tuple[bytes, int]], now: int) -> list[bool]:
        """`claim_nonce` for each of `claims` (pair, expires), in one transaction: one answer
        each, in order; a pair that appears twice is new at most once. Raising claims none."""
        ...


class LedgerStore(Protocol):
    """Our copy of the receipt chains we are a party to (append-only: a receipt only ever
    gains its countersignature, once), the requests we routed to peers, the statements
    that close periods between two nodes, equivocations found and re-sync state."""

    async def issue_receipt(self, pair: tuple[str, str], make: ReceiptMaker) -> StoredReceipt:
        """Our receipt for a request served for a peer: next in the pair's chain, made by
        `make(seq, prev)`, committed before the answer completes, so that a chain never has a
        gap or a fork (a seq signed twice), whatever the crash or however many processes issue
        for the pair. Its usage record is the journal's (`UsageRecorder.record`), appended
        before this is asked. On the request path."""
        ...

    async def issue_receipts(
        self, issued: Sequence[tuple[tuple[str, str], ReceiptMaker]]
    ) -> list[StoredReceipt]:
        """`issue_receipt` for several requests (pair, maker) at once, in one transaction and
        one commit (a provider's group commit): each receipt next in its pair's chain, in the
        order given; all or none. On the request path."""
        ...

    async def add_receipts(
        self, receipts: list[LinkedReceipt]
    ) -> tuple[list[tuple[StoredReceipt, StoredReceipt]], list[tuple[StoredReceipt, str]]]:
        """Append receipts other nodes signed (verified by the caller), in one transaction.
        Idempotent: a known one only gains the countersignature we lacked. Answers the
        pairs (held, offered) where another receipt holds that place (the held one stays),
        and the receipts refused with why (not linking with a neighbour we hold, or a second
        receipt for one request)."""
        ...

    async def sent_requests(self, peer: str, ids: Sequence[str]) -> dict[str, SentRequest]:
        """What we recorded of the requests with these ids that we routed to `peer`."""
        ...

    async def receipts_at(
        self, provider: str, consumer: str, seqs: Sequence[int]
    ) -> list[StoredReceipt]: ...

    async def add_countersignatures(
        self, provider: str, consumer: str, csigs: list[tuple[int, str]], *, to_send: bool = True
    ) -> int:
        """Countersignatures (seq, csig) for receipts that have none yet; how many were added.
        `to_send=False` for a provider storing its consumer's: nothing of ours to send back
        (kept out of the index behind `unsent_countersignatures`)."""
        ...

    async def add_countersignature(
        self, provider: str, consumer: str, seq: int, csig: str
    ) -> bool: ...

    async def receipts(
        self, provider: str, consumer: str, *, after_seq: int = 0, limit: int | None = None
    ) -> list[StoredReceipt]:
        """One pair's chain in seq order, from after `after_seq` (a page if `limit`)."""
        ...

    async def pending_resyncs(self, file_id: str, me: str) -> set[str]:
        """The peers whose chains must be re-synced before we issue them receipts; every peer
        is added when this database is not the file (`file_id`) we last ran on."""
        ...

    async def resynced(self, peer: str) -> None: ...

    async def chain_head(self, provider: str, consumer: str) -> StoredReceipt | None: ...

    async def receipt_pairs(self) -> list[tuple[str, str]]: ...

    async def receipts_since(self, since: int) -> list[StoredReceipt]: ...

    async def unsent_countersignatures(
        self, consumer: str, provider: str, limit: int
    ) -> list[StoredReceipt]:
        """Our countersignatures of `provider`'s receipts not yet sent to it, oldest first
        (by an index of the countersignatures not sent: the job asks every few seconds)."""
        ...

    async def mark_countersignatures_sent(self, receipts: list[StoredReceipt]) -> None: ...

    async def add_equivocation(
        self, provider: str, consumer: str, seq: int, ours: str, theirs: str
    ) -> None:
        """Idempotent: the first one found at a place is kept."""
        ...

    async def add_settlement(self, a: str, b: str, to_seq: int, iat: int, body: str) -> bool:
        """Keep a statement; False if the pair has one issued at `iat` already."""
        ...

    async def settlements(
        self,
        a: str | None = None,
        b: str | None = None,
        *,
        after_iat: int = -1,
        limit: int | None = None,
    ) -> list[str]:
        """Statements (JSON as signed by both), oldest first; of one pair if given."""
        ...


class AuditStore(Protocol):
    """Who did what (written with usage, by `UsageStore.write_batch`)."""

    async def audit(
        self, since_ms: int = 0, limit: int = 100, action: str | None = None
    ) -> list[AuditEvent]:
        """Newest first; `action` may end in `*`."""
        ...


class SessionStore(Protocol):
    """The dashboard's sign-in sessions (`node.admin.session`), by the hash of their cookie."""

    async def insert_session(self, session: SessionRecord) -> None: ...

    async def session(self, id_hash: bytes, now_ms: int) -> SessionRecord | None:
        """The session, unless it has expired by `now_ms`."""
        ...

    async def delete_session(self, id_hash: bytes) -> bool:
        """Whether there was one to delete."""
        ...


class ResponseStore(Protocol):
    """Responses API answers kept (`store`), each readable only with the key that made it."""

    async def put(self, response: StoredResponse) -> None: ...

    async def get(self, key_id: str, response_id: str) -> StoredResponse | None:
        """None when there is none of that id for that key."""
        ...

    async def delete(self, key_id: str, response_id: str) -> bool:
        """Whether there was one to delete."""
        ...


class CacheStore(Protocol):
    """The response cache's answers (`node.gateway.cache`), each under its scope: a read
    names the scope, so another tenant's answer is as absent as one never kept."""

    async def cached(self, scope: str, digest: bytes, now_ms: int) -> CachedAnswer | None:
        """The answer, unless it expired by `now_ms`; a hit counts as a use (for LRU)."""
        ...

    async def keep(self, answer: CachedAnswer, now_ms: int, max_entries: int) -> None:
        """Keep (or replace) the answer, then forget the least recently used beyond
        `max_entries` in all."""
        ...

    async def prune_cache(self, now_ms: int) -> int:
        """Forget expired answers; how many."""
        ...


class LogStore(Protocol):
    """Interaction logs (`node.gateway.interaction_log`), by request id."""

    async def insert_log(self, entry: InteractionLog) -> None:
        """Write it (a second with the same request id is ignored)."""
        ...

    async def logs(self, which: LogFilter) -> list[InteractionLog]:
        """The newest first, at most `which.limit`."""
        ...

    async def log(self, request_id: str) -> InteractionLog | None: ...

    async def prune_logs(self, before_ms: int, max_bytes: int) -> int:
        """Forget entries older than `before_ms`, then the oldest until the rest hold at most
        `max_bytes` of bodies; how many."""
        ...


class ProcessStore(Protocol):
    """The processes serving the node, their heartbeats, and the change epoch of keys and
    tenants: the database counts each change (whoever makes it), each process says which
    epoch it checks requests against, and whoever changes a key can wait for every live
    process to have applied it (`node/gateway/propagation.py`)."""

    async def epoch(self) -> int:
        """The change epoch of keys and tenants now (0 before any change). Read before the
        keys themselves: keys read afterwards hold every change up to it."""
        ...

    async def beat(self, process: ProcessBeat) -> int:
        """The process is alive (its row written, seen now in the database's clock); the
        change epoch now."""
        ...

    async def applied(self, holder: str, epoch: int) -> None:
        """The process checks requests against the keys of `epoch` (or a later one)."""
        ...

    async def live(self) -> list[ProcessRecord]:
        """The processes whose last heartbeat is younger than `PROCESS_FRESH_MS`."""
        ...

    async def leave(self, holder: str) -> None:
        """The process stops: nobody waits for it any more."""
        ...


class Store(Protocol):
    """One of each aggregate, over one database."""

    keys: KeyStore
    spend: SpendStore
    usage: UsageStore
    peers: PeerStore
    ledger: LedgerStore
    audit: AuditStore
    responses: ResponseStore
    sessions: SessionStore
    cache: CacheStore
    logs: LogStore
    processes: ProcessStore

    async def close(self) -> None: ...

    async def ping(self) -> bool:
        """The database answers (for the health check)."""
        ...

    async def watch(self, changed: Callable[[str], None]) -> None:
        """From now on, call `changed("keys")` (keys or tenants) or `changed("peers")` when
        another process, on any host, changes them; the SQLite store never does (the data
        folder's epoch files tell its processes)."""
        ...

    async def database_id(self) -> str:
        """Which database this is (a SQLite file's device and inode; a PostgreSQL cluster's
        system identifier and the database's oid): a restored backup is another, and its
        chain heads may be older than the peers' (`LedgerStore.pending_resyncs`)."""
        ...

    async def prune(self, now: int) -> None:
        """Forget nonces, rate counts, parallel slots and dashboard sessions that can no longer
        matter, and give back the budget holds of processes that stopped renewing them
        (killed)."""
        ...
