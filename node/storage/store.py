"""The node's embedded store: aiosqlite in WAL mode, schema by numbered migrations.

All SQL lives here, so that another backend (PostgreSQL, for several gateway processes of one
node) can be added beside this one without touching the rest.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Literal, TypeVar

import aiosqlite
import msgspec

from ledger.canonical import b64url
from ledger.receipts import GENESIS, SentRequest
from node.gateway.policy import Limits

T = TypeVar("T")

MIGRATIONS: list[str] = [
    # 1: tenants, keys, spend, usage, alerts, audit
    """
    CREATE TABLE tenants (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        limits TEXT NOT NULL,
        metadata TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        hash BLOB NOT NULL,
        is_admin INTEGER NOT NULL DEFAULT 0,
        tenant_id TEXT REFERENCES tenants (id),
        limits TEXT NOT NULL DEFAULT '{}',
        allowed_ips TEXT NOT NULL DEFAULT '[]',
        metadata TEXT NOT NULL DEFAULT '{}',
        expires_at INTEGER,
        created_at INTEGER NOT NULL,
        revoked_at INTEGER,
        prev_hash BLOB,
        prev_valid_until INTEGER
    );
    CREATE TABLE spend (
        scope TEXT NOT NULL,
        period_start INTEGER NOT NULL,
        cap INTEGER NOT NULL,
        spent INTEGER NOT NULL DEFAULT 0,
        reserved INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (scope, period_start)
    ) WITHOUT ROWID;
    CREATE TABLE usage (
        request_id TEXT PRIMARY KEY,
        ts_ms INTEGER NOT NULL,
        key_id TEXT,
        tenant_id TEXT,
        model TEXT NOT NULL,
        deployment TEXT,
        provider TEXT,
        endpoint TEXT NOT NULL,
        stream INTEGER NOT NULL,
        tokens_in INTEGER NOT NULL,
        tokens_out INTEGER NOT NULL,
        estimated INTEGER NOT NULL,
        cost_micros INTEGER NOT NULL,
        latency_ms INTEGER NOT NULL,
        status INTEGER NOT NULL,
        error TEXT
    ) WITHOUT ROWID;
    CREATE INDEX usage_ts ON usage (ts_ms);
    CREATE INDEX usage_key_ts ON usage (key_id, ts_ms);
    CREATE TABLE alerts (
        scope TEXT NOT NULL,
        period_start INTEGER NOT NULL,
        threshold INTEGER NOT NULL,
        ts_ms INTEGER NOT NULL,
        PRIMARY KEY (scope, period_start, threshold)
    ) WITHOUT ROWID;
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts_ms INTEGER NOT NULL,
        actor TEXT,
        action TEXT NOT NULL,
        target TEXT,
        ip TEXT,
        detail TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX audit_ts ON audit (ts_ms);
    """,
    # 2: federation: peers, invites, join requests awaiting approval, node-wide counters
    """
    ALTER TABLE keys ADD COLUMN peer_id TEXT;
    CREATE UNIQUE INDEX keys_peer ON keys (peer_id) WHERE peer_id IS NOT NULL
        AND revoked_at IS NULL;
    CREATE TABLE peers (
        node_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        descriptor TEXT NOT NULL,
        status TEXT NOT NULL,
        key_for_them TEXT,
        key_from_them TEXT,
        advert TEXT,
        listed INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL,
        revoked_at INTEGER
    );
    CREATE TABLE invites (
        token_id TEXT PRIMARY KEY,
        public_key BLOB NOT NULL,
        exp INTEGER NOT NULL,
        uses_left INTEGER NOT NULL,
        models TEXT NOT NULL,
        cap_micros INTEGER,
        cap_period TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE join_requests (
        node_id TEXT PRIMARY KEY,
        descriptor TEXT NOT NULL,
        received_at INTEGER NOT NULL
    );
    CREATE TABLE counters (
        name TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );
    """,
    # 3: answers to approved join requests (the key inside is sealed to the joiner), and the
    # health a node last saw of each peer (for `aihub peers list`)
    """
    CREATE TABLE join_answers (
        node_id TEXT PRIMARY KEY,
        answer TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE peer_health (
        node_id TEXT PRIMARY KEY,
        healthy INTEGER NOT NULL,
        latency_ms INTEGER,
        checked_at INTEGER NOT NULL
    );
    """,
    # 4: the ledger. Receipts are append-only: one chain per (provider, consumer) pair; the
    # only change a row ever gets is its countersignature, once. Charge statements close
    # a period between two nodes.
    """
    CREATE TABLE receipts (
        provider TEXT NOT NULL,
        consumer TEXT NOT NULL,
        seq INTEGER NOT NULL,
        id TEXT NOT NULL,
        hash TEXT NOT NULL,
        amount INTEGER NOT NULL,
        iat INTEGER NOT NULL,
        body TEXT NOT NULL,
        csig TEXT,
        csig_sent INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (provider, consumer, seq)
    );
    CREATE INDEX receipts_id ON receipts (provider, consumer, id);
    CREATE INDEX receipts_iat ON receipts (iat);
    CREATE TRIGGER receipts_no_delete BEFORE DELETE ON receipts
    BEGIN SELECT RAISE(ABORT, 'receipts are append-only'); END;
    CREATE TRIGGER receipts_no_rewrite BEFORE UPDATE OF provider, consumer, seq, id, hash,
        amount, iat, body ON receipts
    BEGIN SELECT RAISE(ABORT, 'receipts are append-only'); END;
    CREATE TRIGGER receipts_csig_once BEFORE UPDATE OF csig ON receipts
        WHEN OLD.csig IS NOT NULL AND NEW.csig IS NOT OLD.csig
    BEGIN SELECT RAISE(ABORT, 'a countersignature is written once'); END;
    CREATE TABLE equivocations (
        provider TEXT NOT NULL,
        consumer TEXT NOT NULL,
        seq INTEGER NOT NULL,
        ours TEXT NOT NULL,
        theirs TEXT NOT NULL,
        found_at INTEGER NOT NULL,
        PRIMARY KEY (provider, consumer, seq)
    );
    CREATE TABLE settlements (
        a TEXT NOT NULL,
        b TEXT NOT NULL,
        to_seq INTEGER NOT NULL,
        iat INTEGER NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (a, b, iat)
    );
    """,
    # 5 (books-intake): what a consumer routed to a peer: the request a receipt from that
    # peer may bill (DESIGN.md, "Who may hand a node a receipt"), written in the batch that
    # writes the request's usage record (a table of its own: local requests pay nothing).
    """
    CREATE TABLE peer_requests (
        request_id TEXT PRIMARY KEY,
        peer_id TEXT NOT NULL,
        model TEXT NOT NULL,
        price_seq INTEGER NOT NULL,
        price_in INTEGER NOT NULL,
        price_out INTEGER NOT NULL,
        status INTEGER NOT NULL
    ) WITHOUT ROWID;
    -- Receipts taken before this rule stay takeable (e.g. back from the peer after a restore):
    -- their requests' records are filled in from the receipt of the peer the usage record
    -- names (deployment `model@peer name`), with no price ceiling (2^53 - 1: the prices were
    -- not recorded). Receipts naming requests we never routed to their provider get none.
    INSERT OR IGNORE INTO peer_requests
    SELECT u.request_id, r.provider, json_extract(r.body, '$.model'),
        json_extract(r.body, '$.price_seq'), 9007199254740991, 9007199254740991, u.status
    FROM usage u JOIN receipts r ON r.id = u.request_id
        JOIN peers p ON p.node_id = r.provider
    WHERE u.provider = 'peer'
        AND u.deployment = json_extract(r.body, '$.model') || '@' || p.name;
    """,
    # 6 (branch pipeline-caps): what a request really cost beyond what was charged (the charge
    # never passes the reservation), and whether its token counts were clamped (untrusted).
    """
    ALTER TABLE usage ADD COLUMN unbilled_micros INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN clamped INTEGER NOT NULL DEFAULT 0;
    """,
    # 7 (restore detection): which database file this is (device and inode: a restored backup
    # is another file), and the peers whose chains must be re-synced from their copies before
    # we issue them another receipt (filled in when the file is not the one we last ran on).
    """
    CREATE TABLE node_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
    CREATE TABLE resync_pending (peer_id TEXT PRIMARY KEY) WITHOUT ROWID;
    """,
    # 8 (conn-hardening): where each join request without an invite came from, so that one
    # address can hold only a few of the pending places
    """
    ALTER TABLE join_requests ADD COLUMN source TEXT NOT NULL DEFAULT '';
    """,
    # 9 (branch replay-limits): what must hold across restarts and every process of a node.
    # Nonces seen (request signatures, join proofs), each kept until what carried it could no
    # longer be accepted; requests admitted per scope and second (rpm) and tokens used (tpm);
    # the parallel slots each live process holds per scope, with an expiry it keeps renewing,
    # so that the slots of a process that died come back.
    """
    CREATE TABLE nonces (
        pair BLOB PRIMARY KEY,
        expires INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX nonces_expires ON nonces (expires);
    CREATE TABLE rate_counts (
        scope TEXT NOT NULL,
        kind TEXT NOT NULL,
        second INTEGER NOT NULL,
        amount INTEGER NOT NULL,
        PRIMARY KEY (scope, kind, second)
    ) WITHOUT ROWID;
    CREATE INDEX rate_counts_second ON rate_counts (second);
    CREATE TABLE parallel_slots (
        scope TEXT NOT NULL,
        holder TEXT NOT NULL,
        slots INTEGER NOT NULL,
        expires INTEGER NOT NULL,
        PRIMARY KEY (scope, holder)
    ) WITHOUT ROWID;
    """,
]

_json = msgspec.json.encode


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
    status: Literal["active", "revoked"]
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


class Hold(msgspec.Struct, frozen=True):
    """Part of a budget reserved for one request, in one scope and period."""

    scope: str
    period_start: int
    amount: int


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
    `slots`: the parallel slots the process holds now, (scope, slots), renewed until
    `now + SLOT_TTL`; `read`: the scopes whose token counts of the last minute to read back."""

    holder: str
    now: int
    takes: list[RateTake] = []
    returns: list[tuple[str, int, int]] = []
    tokens: list[tuple[str, int, int]] = []
    slots: list[tuple[str, int]] = []
    read: list[str] = []


class RateAnswer(msgspec.Struct):
    """`granted[i]` for `takes[i]` (all at least 1, or all 0 when `refused` names the take
    that could not be met), what each scope held before (`used`), and per-second counts of
    the last minute (second, amount) for the refused scope and the scopes read."""

    granted: list[int]
    used: list[int]
    refused: int | None = None
    buckets: dict[str, list[tuple[int, int]]] = {}


# A live process renews its parallel slots every second; a dead one's come back this long
# after its last renewal.
SLOT_TTL = 15
# Rate counts older than this many seconds are no longer read (the window is a minute).
RATE_WINDOW = 60


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


class SpendRow(msgspec.Struct):
    scope: str
    period_start: int
    cap: int
    spent: int
    reserved: int


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


_KEY_COLUMNS = (
    "id, name, hash, is_admin, created_at, tenant_id, limits, allowed_ips, metadata,"
    " expires_at, revoked_at, prev_hash, prev_valid_until, peer_id"
)
_PEER_COLUMNS = (
    "node_id, name, descriptor, status, created_at, key_for_them, key_from_them, advert,"
    " listed, revoked_at"
)
_INVITE_COLUMNS = "token_id, public_key, exp, uses_left, models, cap_micros, cap_period, created_at"
_decode_limits = msgspec.json.Decoder(Limits)
_decode_strings = msgspec.json.Decoder(list[str])
_decode_metadata = msgspec.json.Decoder(dict[str, str])


def _key_from_row(row: sqlite3.Row | tuple) -> KeyRecord:
    return KeyRecord(
        id=row[0],
        name=row[1],
        hash=row[2],
        is_admin=bool(row[3]),
        created_at=row[4],
        tenant_id=row[5],
        limits=_decode_limits.decode(row[6]),
        allowed_ips=_decode_strings.decode(row[7]),
        metadata=_decode_metadata.decode(row[8]),
        expires_at=row[9],
        revoked_at=row[10],
        prev_hash=row[11],
        prev_valid_until=row[12],
        peer_id=row[13],
    )


def _peer_from_row(row: tuple) -> PeerRecord:
    return PeerRecord(*row[:8], listed=bool(row[8]), revoked_at=row[9])


def _invite_from_row(row: tuple) -> InviteRow:
    return InviteRow(
        row[0], row[1], row[2], row[3], _decode_strings.decode(row[4]), row[5], row[6], row[7]
    )


def _key_values(key: KeyRecord) -> tuple:
    return (
        key.id,
        key.name,
        key.hash,
        int(key.is_admin),
        key.created_at,
        key.tenant_id,
        _json(key.limits),
        _json(key.allowed_ips),
        _json(key.metadata),
        key.expires_at,
        key.revoked_at,
        key.prev_hash,
        key.prev_valid_until,
        key.peer_id,
    )


def _tenant_from_row(row: tuple) -> TenantRecord:
    return TenantRecord(
        row[0], row[1], _decode_limits.decode(row[2]), _decode_metadata.decode(row[3]), row[4]
    )


def _scope_values(count: int) -> str:
    return ", ".join(["(?, ?)"] * count)


class Conflict(Exception):
    """A write that would break a uniqueness rule (a name already taken)."""


@contextmanager
def _conflicts() -> Iterator[None]:
    try:
        yield
    except sqlite3.IntegrityError as exc:
        raise Conflict(str(exc)) from None


class Store:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db
        # Every coroutine of the process shares this one connection. A transaction spans
        # several awaits: without the lock another coroutine's statement would run inside it
        # (and be rolled back with it). Cursors are always closed through aiosqlite's thread,
        # never left to the garbage collector of the event loop's thread, which would touch
        # the connection from two threads at once (sqlite's "bad parameter or other API misuse").
        self._lock = asyncio.Lock()
        self._owner: asyncio.Task[object] | None = None
        self._path: Path | None = None
        self._inline: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: Path) -> Store:
        db = await aiosqlite.connect(path, isolation_level=None)
        store = cls(db)
        store._path = path
        for pragma in ("journal_mode=WAL", *_PRAGMAS, "busy_timeout=10000"):
            await store._exec(f"PRAGMA {pragma}")
        await store.migrate()
        return store

    @classmethod
    @asynccontextmanager
    async def opened(cls, path: Path) -> AsyncIterator[Store]:
        """The store for the length of a block (a CLI command, a report), then closed."""
        store = await cls.open(path)
        try:
            yield store
        finally:
            await store.close()

    async def close(self) -> None:
        async with self._lock:
            await self.db.close()
        if self._inline is not None:
            self._inline.close()
            self._inline = None

    @asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        """Hold the connection, unless this task already holds it for a transaction."""
        if self._owner is not None and self._owner is asyncio.current_task():
            yield
            return
        async with self._lock:
            yield

    async def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` on the connection in aiosqlite's thread, in one round trip however many
        statements it runs; its cursors are made, read and dropped there.

        aiosqlite's public calls cost a round trip each (a statement, then closing its
        cursor): its `_execute` queue is the one way to hand it a whole unit of work. It has
        kept that name and signature from 0.17 to 0.22; the version is pinned below 1.
        """
        async with self._turn():
            return await self.db._execute(work, self.db._conn)

    async def _exec(self, sql: str, params: Sequence[object] = ()) -> int:
        """Run one statement; the number of rows it changed."""
        return await self._call(lambda db: db.execute(sql, params).rowcount)

    async def _exec_many(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        await self._call(lambda db: db.executemany(sql, rows).close())

    async def _fetchall(self, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
        return await self._call(lambda db: db.execute(sql, params).fetchall())

    async def _fetchone(self, sql: str, params: Sequence[object] = ()) -> sqlite3.Row | None:
        return await self._call(lambda db: db.execute(sql, params).fetchone())

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        """A write transaction: every statement of the block, or none of them."""
        async with self._lock:
            self._owner = asyncio.current_task()
            try:
                await self._exec("BEGIN IMMEDIATE")
                try:
                    yield
                except BaseException:
                    await self._exec("ROLLBACK")
                    raise
                await self._exec("COMMIT")
            finally:
                self._owner = None

    async def _atomic_now(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`_atomic` for a short transaction on the request path: run at once, on the event
        loop's thread, through a second connection, when the database is free; queued to
        aiosqlite's thread like any other when another writer (another coroutine's
        transaction, another worker process) holds it.

        Handing a transaction to aiosqlite's thread and back costs two thread wake-ups, which
        on a busy core is most of the federated hop's added latency; the statements themselves
        take tens of microseconds (WAL, synchronous=NORMAL: no fsync at commit). The second
        connection never waits for the lock (busy_timeout 0) and never checkpoints (the
        checkpoint's fsync is aiosqlite's connection's to do), so the loop is never blocked on
        the disk.
        """
        inline = self._inline_connection()
        if inline is not None:
            try:
                return _in_transaction(inline, work)
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF not in _BUSY:
                    raise
        return await self._atomic(work)

    def _inline_connection(self) -> sqlite3.Connection | None:
        if self._inline is None and self._path is not None:
            inline = sqlite3.connect(self._path, isolation_level=None)
            for pragma in (*_PRAGMAS, "busy_timeout=0", "wal_autocheckpoint=0"):
                inline.execute(f"PRAGMA {pragma}")
            self._inline = inline
        return self._inline

    async def _atomic(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """A write transaction run whole in aiosqlite's thread: one round trip on the request
        path, and no other coroutine's statement can run inside it. A caller cancelled
        meanwhile leaves it to finish (or roll back) there on its own."""

        return await self._call(lambda db: _in_transaction(db, work))

    async def migrate(self) -> None:
        """Apply the migrations not yet applied, each in its own transaction."""
        row = await self._fetchone("PRAGMA user_version")
        version = row[0] if row else 0
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            async with self._turn():
                await self.db.executescript(
                    f"BEGIN IMMEDIATE; {script}; PRAGMA user_version = {number}; COMMIT;"
                )

    async def ping(self) -> bool:
        return (await self._fetchone("SELECT 1")) == (1,)

    async def _write(self, statements: list[tuple[str, list[tuple]]]) -> None:
        """Run several statements in one write transaction: all of them, or none."""

        def write(db: sqlite3.Connection) -> None:
            for sql, rows in statements:
                if rows:
                    db.executemany(sql, rows)

        await self._atomic(write)

    # --- keys ------------------------------------------------------------------------------

    async def insert_key(self, key: KeyRecord) -> None:
        await self._exec(_INSERT_KEY, _key_values(key))

    async def save_key(self, key: KeyRecord) -> None:
        """Write every mutable field of an existing key."""
        await self._exec(
            "UPDATE keys SET name = ?, hash = ?, tenant_id = ?, limits = ?, allowed_ips = ?,"
            " metadata = ?, expires_at = ?, revoked_at = ?, prev_hash = ?, prev_valid_until = ?"
            " WHERE id = ?",
            (
                key.name,
                key.hash,
                key.tenant_id,
                _json(key.limits),
                _json(key.allowed_ips),
                _json(key.metadata),
                key.expires_at,
                key.revoked_at,
                key.prev_hash,
                key.prev_valid_until,
                key.id,
            ),
        )

    async def keys(self, *, include_revoked: bool = True) -> list[KeyRecord]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        rows = await self._fetchall(
            f"SELECT {_KEY_COLUMNS} FROM keys{where} ORDER BY created_at, id"
        )
        return [_key_from_row(row) for row in rows]

    async def key(self, key_id: str) -> KeyRecord | None:
        row = await self._fetchone(f"SELECT {_KEY_COLUMNS} FROM keys WHERE id = ?", (key_id,))
        return _key_from_row(row) if row else None

    async def active_keys(self) -> list[KeyRecord]:
        return await self.keys(include_revoked=False)

    # --- peers and invites ------------------------------------------------------------------

    async def insert_invite(self, invite: InviteRow) -> None:
        await self._exec(
            f"INSERT INTO invites ({_INVITE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
            (
                invite.token_id,
                invite.public_key,
                invite.exp,
                invite.uses_left,
                _json(invite.models),
                invite.cap_micros,
                invite.cap_period,
                invite.created_at,
            ),
        )

    async def invite(self, token_id: str) -> InviteRow | None:
        row = await self._fetchone(
            f"SELECT {_INVITE_COLUMNS} FROM invites WHERE token_id = ?", (token_id,)
        )
        return _invite_from_row(row) if row else None

    async def accept_join(
        self, token_id: str | None, now: int, key: KeyRecord, peer: PeerRecord
    ) -> bool:
        """Spend one use of an invite (if any), issue the peer's key and record the peer, in
        one transaction: a used-up or expired invite changes nothing."""
        async with self._transaction():
            if token_id is not None:
                spent = await self._exec(
                    "UPDATE invites SET uses_left = uses_left - 1"
                    " WHERE token_id = ? AND uses_left > 0 AND exp > ?",
                    (token_id, now),
                )
                if spent != 1:
                    return False
            # A peer that joins again gets a fresh key; the old one stops working.
            await self._exec(
                "UPDATE keys SET revoked_at = ? WHERE peer_id = ? AND revoked_at IS NULL",
                (now, key.peer_id),
            )
            await self._exec(_INSERT_KEY, _key_values(key))
            await self._exec(_UPSERT_PEER, _peer_values(peer))
            await self._exec("DELETE FROM join_requests WHERE node_id = ?", (peer.node_id,))
        return True

    async def save_peer(self, peer: PeerRecord) -> None:
        await self._exec(_UPSERT_PEER, _peer_values(peer))

    async def peers(self, *, include_revoked: bool = False) -> list[PeerRecord]:
        where = "" if include_revoked else " WHERE status != 'revoked'"
        rows = await self._fetchall(
            f"SELECT {_PEER_COLUMNS} FROM peers{where} ORDER BY name, node_id"
        )
        return [_peer_from_row(row) for row in rows]

    async def peer(self, node_id: str) -> PeerRecord | None:
        row = await self._fetchone(
            f"SELECT {_PEER_COLUMNS} FROM peers WHERE node_id = ?", (node_id,)
        )
        return _peer_from_row(row) if row else None

    async def revoke_peer(self, node_id: str, now: int, status: str = "revoked") -> None:
        """Cut a peer off (`revoked` by the admin, or `suspended` for cheating): its status,
        and the key we issued to it, in one transaction."""
        await self._write(
            [
                (
                    "UPDATE peers SET status = ?, revoked_at = ? WHERE node_id = ?",
                    [(status, now, node_id)],
                ),
                (
                    "UPDATE keys SET revoked_at = ? WHERE peer_id = ? AND revoked_at IS NULL",
                    [(now, node_id)],
                ),
            ]
        )

    async def add_join_request(
        self, node_id: str, descriptor: str, now: int, bounds: JoinRequestBounds
    ) -> Literal["source", "total"] | None:
        """Keep a join request (a node asking again refreshes its descriptor, not its age);
        None, or which bound refused it. Requests older than the bounds' ttl are dropped
        first. One transaction: two workers cannot both take the last place."""

        def add(db: sqlite3.Connection) -> Literal["source", "total"] | None:
            db.execute("DELETE FROM join_requests WHERE received_at <= ?", (now - bounds.ttl,))
            if db.execute(
                "UPDATE join_requests SET descriptor = ? WHERE node_id = ?", (descriptor, node_id)
            ).rowcount:
                return None
            (from_source,) = db.execute(
                "SELECT COUNT(*) FROM join_requests WHERE source = ?", (bounds.source,)
            ).fetchone()
            if from_source >= bounds.per_source:
                return "source"
            (pending,) = db.execute("SELECT COUNT(*) FROM join_requests").fetchone()
            if pending >= bounds.total:
                return "total"
            db.execute(
                "INSERT INTO join_requests (node_id, descriptor, received_at, source)"
                " VALUES (?, ?, ?, ?)",
                (node_id, descriptor, now, bounds.source),
            )
            return None

        return await self._atomic(add)

    async def join_requests(self) -> list[tuple[str, str, int]]:
        rows = await self._fetchall(
            "SELECT node_id, descriptor, received_at FROM join_requests ORDER BY received_at"
        )
        return [(row[0], row[1], row[2]) for row in rows]

    async def join_request(self, node_id: str) -> str | None:
        """The descriptor a pending join request came with."""
        row = await self._fetchone(
            "SELECT descriptor FROM join_requests WHERE node_id = ?", (node_id,)
        )
        return row[0] if row else None

    async def save_join_answer(self, node_id: str, answer: str, now: int) -> None:
        await self._exec(
            "INSERT INTO join_answers VALUES (?, ?, ?) ON CONFLICT (node_id)"
            " DO UPDATE SET answer = excluded.answer, created_at = excluded.created_at",
            (node_id, answer, now),
        )

    async def join_answer(self, node_id: str) -> str | None:
        row = await self._fetchone("SELECT answer FROM join_answers WHERE node_id = ?", (node_id,))
        return row[0] if row else None

    async def save_peer_health(
        self, node_id: str, healthy: bool, latency_ms: int | None, now: int
    ) -> None:
        await self._exec(
            "INSERT INTO peer_health VALUES (?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET"
            " healthy = excluded.healthy, latency_ms = excluded.latency_ms,"
            " checked_at = excluded.checked_at",
            (node_id, int(healthy), latency_ms, now),
        )

    async def peer_health(self) -> dict[str, tuple[bool, int | None, int]]:
        rows = await self._fetchall(
            "SELECT node_id, healthy, latency_ms, checked_at FROM peer_health"
        )
        return {row[0]: (bool(row[1]), row[2], row[3]) for row in rows}

    async def next_counter(self, name: str) -> int:
        """Atomically increment and return a node-wide counter (e.g. the advert seq)."""
        row = await self._fetchone(
            "INSERT INTO counters VALUES (?, 1) ON CONFLICT (name)"
            " DO UPDATE SET value = value + 1 RETURNING value",
            (name,),
        )
        assert row is not None
        return int(row[0])

    # --- replay refusal and rate limits, across processes -------------------------------------

    async def claim_nonce(self, pair: bytes, expires: int, now: int) -> bool:
        """Record `pair` (a digest of who signed and the nonce) as used until `expires`: True
        if it is new, False if it is already recorded and not expired (a replay). One
        statement, so two processes cannot both see it new."""
        return await self._atomic_now(lambda db: _claim_nonce(db, pair, expires, now))

    async def rate_sync(self, sync: RateSync) -> RateAnswer:
        """Apply one process's rate-limit bookkeeping and grant its takes, in one transaction:
        every take gets at least one, or none does."""
        return await self._atomic_now(lambda db: _rate_sync(db, sync))

    async def prune(self, now: int) -> None:
        """Forget nonces, rate counts and parallel slots that can no longer matter."""

        def prune(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM nonces WHERE expires < ?", (now,))
            db.execute("DELETE FROM rate_counts WHERE second < ?", (now - 2 * RATE_WINDOW,))
            db.execute("DELETE FROM parallel_slots WHERE expires < ?", (now,))

        await self._atomic(prune)

    async def release_slots(self, holder: str) -> None:
        """A process stops: the parallel slots it held come back at once."""
        await self._exec("DELETE FROM parallel_slots WHERE holder = ?", (holder,))

    # --- tenants ---------------------------------------------------------------------------

    async def insert_tenant(self, tenant: TenantRecord) -> None:
        """Conflict if the name is taken."""
        with _conflicts():
            await self._insert_tenant(tenant)

    async def _insert_tenant(self, tenant: TenantRecord) -> None:
        await self._exec(
            "INSERT INTO tenants (id, name, limits, metadata, created_at) VALUES (?,?,?,?,?)",
            (
                tenant.id,
                tenant.name,
                _json(tenant.limits),
                _json(tenant.metadata),
                tenant.created_at,
            ),
        )

    async def save_tenant(self, tenant: TenantRecord) -> None:
        """Conflict if the (new) name is taken."""
        with _conflicts():
            await self._exec(
                "UPDATE tenants SET name = ?, limits = ?, metadata = ? WHERE id = ?",
                (tenant.name, _json(tenant.limits), _json(tenant.metadata), tenant.id),
            )

    async def tenants(self) -> list[TenantRecord]:
        rows = await self._fetchall(
            "SELECT id, name, limits, metadata, created_at FROM tenants ORDER BY name"
        )
        return [_tenant_from_row(row) for row in rows]

    async def tenant(self, id_or_name: str) -> TenantRecord | None:
        row = await self._fetchone(
            "SELECT id, name, limits, metadata, created_at FROM tenants WHERE id = ? OR name = ?",
            (id_or_name, id_or_name),
        )
        return _tenant_from_row(row) if row else None

    # --- spend -----------------------------------------------------------------------------

    async def open_periods(self, rows: list[tuple[str, int, int]]) -> None:
        """Make sure each (scope, period start) row exists and carries the current cap."""
        await self._exec_many(
            "INSERT INTO spend (scope, period_start, cap) VALUES (?, ?, ?)"
            " ON CONFLICT (scope, period_start) DO UPDATE SET cap = excluded.cap",
            rows,
        )

    async def reserve(self, amount: int, scopes: list[tuple[str, int]]) -> bool:
        """Reserve `amount` in every scope, or in none if any would pass its cap.

        One statement, so that it is atomic against every other reservation, in this process
        or another: concurrent requests can never take a budget past its cap.
        """
        values = _scope_values(len(scopes))
        flat = [part for scope in scopes for part in scope]
        changed = await self._exec(
            f"UPDATE spend SET reserved = reserved + ?"
            f" WHERE (scope, period_start) IN (VALUES {values})"
            f" AND NOT EXISTS (SELECT 1 FROM spend WHERE (scope, period_start) IN"
            f" (VALUES {values}) AND spent + reserved + ? > cap)",
            [amount, *flat, *flat, amount],
        )
        return changed == len(scopes)

    async def release(self, leases: list[tuple[int, tuple[str, int]]]) -> None:
        """Give back reserved budget that no request will use: (amount, (scope, start))."""
        await self._exec_many(
            "UPDATE spend SET reserved = MAX(reserved - ?, 0) WHERE scope = ? AND period_start = ?",
            [(amount, scope, start) for amount, (scope, start) in leases],
        )

    async def release_all_reservations(self) -> None:
        """At start-up no request is in flight: what is still reserved was lost in a crash."""
        await self._exec("UPDATE spend SET reserved = 0 WHERE reserved != 0")

    async def spend(self, scopes: list[tuple[str, int]]) -> list[SpendRow]:
        if not scopes:
            return []
        values = _scope_values(len(scopes))
        rows = await self._fetchall(
            "SELECT scope, period_start, cap, spent, reserved FROM spend"
            f" WHERE (scope, period_start) IN (VALUES {values})",
            [part for scope in scopes for part in scope],
        )
        return [SpendRow(*row) for row in rows]

    async def claim_alert(self, scope: str, period_start: int, threshold: int) -> bool:
        """True the first time a threshold is reached in a period, False ever after."""
        claimed = await self._exec(
            "INSERT OR IGNORE INTO alerts VALUES (?, ?, ?, ?)",
            (scope, period_start, threshold, now_ms()),
        )
        return claimed == 1

    # --- ledger ----------------------------------------------------------------------------

    async def settle_with_receipt(
        self, charge: Charge, pair: tuple[str, str], make: ReceiptMaker
    ) -> StoredReceipt:
        """A request served for a peer: its usage record, its spend and its receipt (next in
        the pair's chain, made by `make(seq, prev)`) in one transaction, so that a completed
        request always has its receipt and a chain never has a gap, whatever the crash."""
        provider, consumer = pair

        def write(db: sqlite3.Connection) -> StoredReceipt:
            row = db.execute(
                "SELECT seq, body FROM receipts WHERE provider = ? AND consumer = ?"
                " ORDER BY seq DESC LIMIT 1",
                (provider, consumer),
            ).fetchone()
            # The link is the hash of what was signed, recomputed: a damaged `hash` column
            # must not break the chain the consumer checks.
            seq, prev = (row[0] + 1, body_hash(row[1])) if row else (1, None)
            receipt = make(seq, prev)
            db.execute(_INSERT_RECEIPT, msgspec.structs.astuple(receipt))
            _write_charges(db, [charge], [])
            return receipt

        return await self._atomic_now(write)

    async def add_receipts(
        self, receipts: list[LinkedReceipt]
    ) -> tuple[list[tuple[StoredReceipt, StoredReceipt]], list[tuple[StoredReceipt, str]]]:
        """Append receipts other nodes signed (verified by the caller), in one transaction:
        each new one is added, a known one gains the countersignature we lacked. Answers the
        pairs (held, offered) where the provider had signed a different receipt for that
        place in its chain (equivocation: the held one stays), and the receipts refused, with
        why: one that does not link with a neighbour we hold (its `prev` is not the hash of
        the receipt before, or the receipt after does not name it), or a second receipt for
        a request that has one already. Hashes are recomputed from the stored bodies, never
        read from the `hash` column."""

        def write(
            db: sqlite3.Connection,
        ) -> tuple[list[tuple[StoredReceipt, StoredReceipt]], list[tuple[StoredReceipt, str]]]:
            conflicts, refused = [], []
            for linked in receipts:
                held = _add_receipt(db, linked)
                if isinstance(held, str):
                    refused.append((linked.receipt, held))
                elif held is not None:
                    conflicts.append((held, linked.receipt))
            return conflicts, refused

        return await self._atomic(write)

    async def sent_requests(self, peer: str, ids: Sequence[str]) -> dict[str, SentRequest]:
        """What we recorded of the requests with these ids that we routed to `peer`."""
        found: dict[str, SentRequest] = {}
        for start in range(0, len(ids), 500):
            chunk = list(ids[start : start + 500])
            rows = await self._fetchall(
                f"SELECT {_SENT_COLUMNS} FROM peer_requests"
                f" WHERE request_id IN ({','.join('?' * len(chunk))}) AND peer_id = ?",
                (*chunk, peer),
            )
            found.update((row[0], SentRequest(*row)) for row in rows)
        return found

    async def receipts_at(
        self, provider: str, consumer: str, seqs: Sequence[int]
    ) -> list[StoredReceipt]:
        """The receipts of one pair's chain at these places (those it has)."""
        if not seqs:
            return []
        rows = await self._fetchall(
            f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE provider = ? AND consumer = ?"
            f" AND seq IN ({','.join('?' * len(seqs))})",
            (provider, consumer, *seqs),
        )
        return [StoredReceipt(*row) for row in rows]

    async def add_countersignatures(
        self, provider: str, consumer: str, csigs: list[tuple[int, str]]
    ) -> int:
        """Countersignatures (seq, csig) for receipts that have none yet; how many were added."""
        rows = [(csig, provider, consumer, seq) for seq, csig in csigs]
        return await self._call(
            lambda db: (
                db.executemany(
                    "UPDATE receipts SET csig = ? WHERE provider = ? AND consumer = ? AND seq = ?"
                    " AND csig IS NULL",
                    rows,
                ).rowcount
            )
        )

    async def add_countersignature(self, provider: str, consumer: str, seq: int, csig: str) -> bool:
        return await self.add_countersignatures(provider, consumer, [(seq, csig)]) == 1

    async def receipts(
        self,
        provider: str,
        consumer: str,
        *,
        after_seq: int = 0,
        limit: int | None = None,
    ) -> list[StoredReceipt]:
        """One pair's chain in seq order, from after `after_seq` (a page if `limit`)."""
        rows = await self._fetchall(
            f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE provider = ? AND consumer = ?"
            " AND seq > ? ORDER BY seq LIMIT ?",
            (provider, consumer, after_seq, -1 if limit is None else limit),
        )
        return [StoredReceipt(*row) for row in rows]

    async def pending_resyncs(self, file_id: str, me: str) -> set[str]:
        """The peers whose chains must be re-synced before we issue them receipts. When this
        database is not the file we last ran on (`file_id` differs: a restored backup, a copy
        moved to another disk), or we have no note of that yet but have issued receipts,
        every peer is added: our chain heads may be older than what the peers hold."""

        def work(db: sqlite3.Connection) -> set[str]:
            row = db.execute("SELECT value FROM node_meta WHERE name = 'file_id'").fetchone()
            if row is None:
                issued = db.execute(
                    "SELECT 1 FROM receipts WHERE provider = ? LIMIT 1", (me,)
                ).fetchone()
                moved = issued is not None
            else:
                moved = row[0] != file_id
            if moved:
                db.execute("INSERT OR IGNORE INTO resync_pending SELECT node_id FROM peers")
            db.execute(
                "INSERT INTO node_meta (name, value) VALUES ('file_id', ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (file_id,),
            )
            return {r[0] for r in db.execute("SELECT peer_id FROM resync_pending")}

        return await self._atomic(work)

    async def resynced(self, peer: str) -> None:
        await self._exec("DELETE FROM resync_pending WHERE peer_id = ?", (peer,))

    async def chain_head(self, provider: str, consumer: str) -> StoredReceipt | None:
        """The last receipt of one pair's chain (highest seq), if any."""
        row = await self._fetchone(
            f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE provider = ? AND consumer = ?"
            " ORDER BY seq DESC LIMIT 1",
            (provider, consumer),
        )
        return StoredReceipt(*row) if row is not None else None

    async def receipt_pairs(self) -> list[tuple[str, str]]:
        rows = await self._fetchall("SELECT DISTINCT provider, consumer FROM receipts")
        return [(row[0], row[1]) for row in rows]

    async def receipts_since(self, since: int) -> list[StoredReceipt]:
        rows = await self._fetchall(
            f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE iat >= ?"
            " ORDER BY iat, provider, consumer, seq",
            (since,),
        )
        return [StoredReceipt(*row) for row in rows]

    async def unsent_countersignatures(self, consumer: str, limit: int) -> list[StoredReceipt]:
        rows = await self._fetchall(
            f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE consumer = ? AND csig IS NOT NULL"
            " AND csig_sent = 0 ORDER BY provider, seq LIMIT ?",
            (consumer, limit),
        )
        return [StoredReceipt(*row) for row in rows]

    async def mark_countersignatures_sent(self, receipts: list[StoredReceipt]) -> None:
        await self._exec_many(
            "UPDATE receipts SET csig_sent = 1 WHERE provider = ? AND consumer = ? AND seq = ?",
            [(r.provider, r.consumer, r.seq) for r in receipts],
        )

    async def add_equivocation(
        self, provider: str, consumer: str, seq: int, ours: str, theirs: str
    ) -> None:
        await self._exec(
            "INSERT OR IGNORE INTO equivocations VALUES (?, ?, ?, ?, ?, ?)",
            (provider, consumer, seq, ours, theirs, int(time.time())),
        )

    async def add_settlement(self, a: str, b: str, to_seq: int, iat: int, body: str) -> bool:
        """Keep a statement; False if the pair has one issued at `iat` already."""
        added = await self._exec(
            "INSERT OR IGNORE INTO settlements VALUES (?, ?, ?, ?, ?)", (a, b, to_seq, iat, body)
        )
        return added == 1

    async def settlements(
        self,
        a: str | None = None,
        b: str | None = None,
        *,
        after_iat: int = -1,
        limit: int | None = None,
    ) -> list[str]:
        """Charge statements (JSON as signed by both), oldest first; of one pair if given,
        issued after `after_iat` (a page if `limit`)."""
        if a is None:
            rows = await self._fetchall("SELECT body FROM settlements ORDER BY iat")
        else:
            rows = await self._fetchall(
                "SELECT body FROM settlements WHERE a = ? AND b = ? AND iat > ?"
                " ORDER BY iat LIMIT ?",
                (a, b, after_iat, -1 if limit is None else limit),
            )
        return [row[0] for row in rows]

    # --- usage and audit -------------------------------------------------------------------

    async def write_batch(self, charges: list[Charge], events: list[AuditEvent]) -> None:
        """Usage records, the spend they settle and audit events: one transaction."""
        await self._atomic(lambda db: _write_charges(db, charges, events))

    async def usage_since(self, since_ms: int = 0) -> list[UsageRecord]:
        rows = await self._fetchall(
            "SELECT * FROM usage WHERE ts_ms >= ? ORDER BY ts_ms", (since_ms,)
        )
        return [
            msgspec.convert(dict(zip(_USAGE_FIELDS, row, strict=True)), UsageRecord, strict=False)
            for row in rows
        ]

    async def usage_report(
        self, by: Literal["key", "tenant", "model"], since_ms: int
    ) -> list[UsageGroup]:
        column = {"key": "key_id", "tenant": "tenant_id", "model": "model"}[by]
        rows = await self._fetchall(
            f"SELECT {column}, COUNT(*), SUM(status >= 400), SUM(tokens_in), SUM(tokens_out),"
            f" SUM(cost_micros), SUM(unbilled_micros), SUM(clamped)"
            f" FROM usage WHERE ts_ms >= ? GROUP BY {column}"
            " ORDER BY SUM(cost_micros) DESC, COUNT(*) DESC",
            (since_ms,),
        )
        return [UsageGroup(*row) for row in rows]

    async def audit(
        self, since_ms: int = 0, limit: int = 100, action: str | None = None
    ) -> list[AuditEvent]:
        where, params = "ts_ms >= ?", [since_ms]
        if action:
            where += " AND action LIKE ?"
            params.append(action.replace("*", "%"))
        rows = await self._fetchall(
            f"SELECT ts_ms, action, actor, target, ip, detail FROM audit WHERE {where}"
            " ORDER BY id DESC LIMIT ?",
            [*params, limit],
        )
        return [AuditEvent(r[0], r[1], r[2], r[3], r[4], msgspec.json.decode(r[5])) for r in rows]


_USAGE_FIELDS = UsageRecord.__struct_fields__
_SENT_COLUMNS = "request_id, peer_id, model, price_seq, price_in, price_out, status"
_INSERT_SENT = f"INSERT OR IGNORE INTO peer_requests ({_SENT_COLUMNS}) VALUES (?,?,?,?,?,?,?)"
_USAGE_PLACEHOLDERS = ",".join("?" * len(_USAGE_FIELDS))
_INSERT_RECEIPT = (
    "INSERT INTO receipts (provider, consumer, seq, id, hash, amount, iat, body, csig,"
    " csig_sent) VALUES (?,?,?,?,?,?,?,?,?,?)"
)
_INSERT_KEY = f"INSERT INTO keys ({_KEY_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
_UPSERT_PEER = (
    f"INSERT INTO peers ({_PEER_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT (node_id) DO UPDATE SET name = excluded.name,"
    " descriptor = excluded.descriptor, status = excluded.status,"
    " key_for_them = COALESCE(excluded.key_for_them, key_for_them),"
    " key_from_them = COALESCE(excluded.key_from_them, key_from_them),"
    " advert = COALESCE(excluded.advert, advert), listed = excluded.listed,"
    " revoked_at = excluded.revoked_at"
)


def _peer_values(peer: PeerRecord) -> tuple:
    return (
        peer.node_id,
        peer.name,
        peer.descriptor,
        peer.status,
        peer.created_at,
        peer.key_for_them,
        peer.key_from_them,
        peer.advert,
        int(peer.listed),
        peer.revoked_at,
    )


def now_ms() -> int:
    return int(time.time() * 1000)


# Settings of each connection (journal_mode=WAL is the file's own, set once). NORMAL: a commit
# survives the process crashing (not the machine) without an fsync; the default, FULL, fsyncs.
_PRAGMAS = ("synchronous=NORMAL", "foreign_keys=ON")
# Another writer holds the database (the primary result codes, under any extended code).
_BUSY = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _in_transaction(db: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    """`work` in a write transaction on `db`: all of its statements, or none."""
    db.execute("BEGIN IMMEDIATE")
    try:
        result = work(db)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return result


def _claim_nonce(db: sqlite3.Connection, pair: bytes, expires: int, now: int) -> bool:
    # A row left by an expired nonce (not yet pruned) is taken over: the expiry check, not
    # this table, refuses a signature that old.
    return (
        db.execute(
            "INSERT INTO nonces (pair, expires) VALUES (?, ?) ON CONFLICT (pair)"
            " DO UPDATE SET expires = excluded.expires WHERE nonces.expires < ?",
            (pair, expires, now),
        ).rowcount
        == 1
    )


def _rate_sync(db: sqlite3.Connection, sync: RateSync) -> RateAnswer:
    now, holder = sync.now, sync.holder
    db.executemany(
        "UPDATE rate_counts SET amount = MAX(amount - ?, 0)"
        " WHERE scope = ? AND kind = 'requests' AND second = ?",
        [(amount, scope, second) for scope, second, amount in sync.returns],
    )
    db.executemany(_ADD_RATE, [(scope, "tokens", second, n) for scope, second, n in sync.tokens])
    db.executemany(
        "INSERT INTO parallel_slots VALUES (?, ?, ?, ?) ON CONFLICT (scope, holder)"
        " DO UPDATE SET slots = excluded.slots, expires = excluded.expires",
        [(scope, holder, slots, now + SLOT_TTL) for scope, slots in sync.slots],
    )
    used = [_rate_used(db, take, now) for take in sync.takes]
    refused = next(
        (i for i, take in enumerate(sync.takes) if used[i] >= take.limit),
        None,
    )
    answer = RateAnswer(granted=[0] * len(sync.takes), used=used, refused=refused)
    if refused is None:
        answer.granted = [
            min(take.want, take.limit - held) for take, held in zip(sync.takes, used, strict=True)
        ]
        for take, granted in zip(sync.takes, answer.granted, strict=True):
            _grant(db, take, granted, holder, now)
    else:
        take = sync.takes[refused]
        answer.buckets[take.scope] = _buckets(db, take.scope, take.kind, now)
    for scope in sync.read:
        answer.buckets[scope] = _buckets(db, scope, "tokens", now)
    return answer


_ADD_RATE = (
    "INSERT INTO rate_counts VALUES (?, ?, ?, ?) ON CONFLICT (scope, kind, second)"
    " DO UPDATE SET amount = amount + excluded.amount"
)


def _rate_used(db: sqlite3.Connection, take: RateTake, now: int) -> int:
    if take.kind == "parallel":
        sql = "SELECT COALESCE(SUM(slots), 0) FROM parallel_slots WHERE scope = ? AND expires >= ?"
        return int(db.execute(sql, (take.scope, now)).fetchone()[0])
    sql = (
        "SELECT COALESCE(SUM(amount), 0) FROM rate_counts"
        " WHERE scope = ? AND kind = ? AND second >= ?"
    )
    return int(db.execute(sql, (take.scope, take.kind, now - RATE_WINDOW)).fetchone()[0])


def _grant(db: sqlite3.Connection, take: RateTake, granted: int, holder: str, now: int) -> None:
    if take.kind == "parallel":
        # Slots of this holder's row that expired are no longer its: start again from none.
        db.execute(
            "INSERT INTO parallel_slots VALUES (?, ?, ?, ?) ON CONFLICT (scope, holder)"
            " DO UPDATE SET slots = IIF(expires >= ?, slots, 0) + excluded.slots,"
            " expires = excluded.expires",
            (take.scope, holder, granted, now + SLOT_TTL, now),
        )
    else:
        db.execute(_ADD_RATE, (take.scope, take.kind, now, granted))


def _buckets(db: sqlite3.Connection, scope: str, kind: str, now: int) -> list[tuple[int, int]]:
    rows = db.execute(
        "SELECT second, amount FROM rate_counts WHERE scope = ? AND kind = ? AND second >= ?"
        " AND amount > 0 ORDER BY second",
        (scope, kind, now - RATE_WINDOW),
    ).fetchall()
    return [(int(second), int(amount)) for second, amount in rows]


def body_hash(body: str) -> str:
    """A stored receipt's chain hash, from its body (the bytes its provider signed, with
    `sig`, without `csig`): what the next receipt's `prev` must be."""
    return b64url(hashlib.sha256(body.encode()).digest())


def _prev_of(body: str) -> str | None:
    try:
        prev = msgspec.json.decode(body).get("prev")
    except (msgspec.DecodeError, AttributeError):
        return None
    return prev if isinstance(prev, str) else None


def _misfit(db: sqlite3.Connection, linked: LinkedReceipt) -> str | None:
    """Why a new receipt does not fit our copy of its chain, or None: its neighbours that we
    hold must link with it, and its request must not have a receipt already."""
    receipt = linked.receipt
    pair = (receipt.provider, receipt.consumer)
    twin = db.execute(
        "SELECT seq FROM receipts WHERE provider = ? AND consumer = ? AND id = ? LIMIT 1",
        (*pair, receipt.id),
    ).fetchone()
    if twin is not None:
        return f"request {receipt.id} has a receipt already (seq {twin[0]})"
    before = db.execute(
        "SELECT body FROM receipts WHERE provider = ? AND consumer = ? AND seq = ?",
        (*pair, receipt.seq - 1),
    ).fetchone()
    if before is not None and body_hash(before[0]) != linked.prev:
        return f"prev is not the hash of seq {receipt.seq - 1}"
    after = db.execute(
        "SELECT body FROM receipts WHERE provider = ? AND consumer = ? AND seq = ?",
        (*pair, receipt.seq + 1),
    ).fetchone()
    if after is not None and _prev_of(after[0]) != body_hash(receipt.body):
        return f"seq {receipt.seq + 1} does not link to it"
    return None


def _add_receipt(db: sqlite3.Connection, linked: LinkedReceipt) -> StoredReceipt | str | None:
    """See `Store.add_receipts`: the receipt held at that place if it differs, why the
    receipt is refused, or None (taken, or known already)."""
    receipt = linked.receipt
    place = (receipt.provider, receipt.consumer, receipt.seq)
    row = db.execute(
        f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE provider = ? AND consumer = ? AND seq = ?",
        place,
    ).fetchone()
    if row is None:
        if receipt.seq == 1 and linked.prev != GENESIS:
            return "seq 1 must start the chain"
        misfit = _misfit(db, linked)
        if misfit is not None:
            return misfit
        db.execute(_INSERT_RECEIPT, msgspec.structs.astuple(receipt))
        return None
    held = StoredReceipt(*row)
    if body_hash(held.body) != body_hash(receipt.body):
        return held
    if held.csig is None and receipt.csig is not None:
        db.execute(
            "UPDATE receipts SET csig = ? WHERE provider = ? AND consumer = ? AND seq = ?",
            (receipt.csig, *place),
        )
    return None


def _write_charges(db: sqlite3.Connection, charges: list[Charge], events: list[AuditEvent]) -> None:
    """Write usage records, settle the spend they hold and log audit events. A record already
    written (a journal replayed after a crash that came after its commit) is skipped together
    with its spend, so that writing a charge twice counts it once. Statements run as
    `executemany`: a Python loop here holds the GIL against the event loop's thread."""
    ids = [s.record.request_id for s in charges]
    known: set[str] = set()
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        rows = db.execute(
            f"SELECT request_id FROM usage WHERE request_id IN ({','.join('?' * len(chunk))})",
            chunk,
        )
        known.update(row[0] for row in rows)
    fresh = [s for s in charges if s.record.request_id not in known]
    db.executemany(
        f"INSERT OR IGNORE INTO usage VALUES ({_USAGE_PLACEHOLDERS})",
        [msgspec.structs.astuple(s.record) for s in fresh],
    )
    db.executemany(
        "UPDATE spend SET reserved = MAX(reserved - ?, 0), spent = spent + ?"
        " WHERE scope = ? AND period_start = ?",
        [
            (hold.amount, s.record.cost_micros, hold.scope, hold.period_start)
            for s in fresh
            for hold in s.holds
        ],
    )
    sent = [s.sent for s in fresh if s.sent is not None]
    if sent:
        db.executemany(_INSERT_SENT, [msgspec.structs.astuple(request) for request in sent])
    if events:
        db.executemany(
            "INSERT INTO audit (ts_ms, actor, action, target, ip, detail) VALUES (?,?,?,?,?,?)",
            [(e.ts_ms, e.actor, e.action, e.target, e.ip, _json(e.detail)) for e in events],
        )


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


_RECEIPT_COLUMNS = "provider, consumer, seq, id, hash, amount, iat, body, csig, csig_sent"
ReceiptMaker = Callable[[int, str | None], StoredReceipt]
