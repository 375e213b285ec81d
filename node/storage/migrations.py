"""The schema, as numbered migrations shared by every backend: migration n is the same change
for SQLite and PostgreSQL, each in its own dialect (where they differ, the difference is here,
in the migration, and nowhere else). Append only: an existing database is brought up to date by
applying the ones it lacks, in order (SQLite counts them in `PRAGMA user_version`, PostgreSQL in
`aihub_schema`).

PostgreSQL's column types keep SQLite's row shapes, so that one row codec serves both and
`aihub db copy` moves rows as they are: integers are BIGINT (SQLite's are 64-bit), flags
INTEGER 0/1, blobs BYTEA, JSON TEXT.
"""

from __future__ import annotations

from typing import NamedTuple


class Migration(NamedTuple):
    sqlite: str
    postgres: str


MIGRATIONS: list[Migration] = [
    # 1: tenants, keys, spend, usage, alerts, audit
    Migration(
        sqlite="""
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
        postgres="""
        CREATE TABLE tenants (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            limits TEXT NOT NULL,
            metadata TEXT NOT NULL,
            created_at BIGINT NOT NULL
        );
        CREATE TABLE keys (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            hash BYTEA NOT NULL,
            is_admin BIGINT NOT NULL DEFAULT 0,
            tenant_id TEXT REFERENCES tenants (id),
            limits TEXT NOT NULL DEFAULT '{}',
            allowed_ips TEXT NOT NULL DEFAULT '[]',
            metadata TEXT NOT NULL DEFAULT '{}',
            expires_at BIGINT,
            created_at BIGINT NOT NULL,
            revoked_at BIGINT,
            prev_hash BYTEA,
            prev_valid_until BIGINT
        );
        CREATE TABLE spend (
            scope TEXT NOT NULL,
            period_start BIGINT NOT NULL,
            cap BIGINT NOT NULL,
            spent BIGINT NOT NULL DEFAULT 0,
            reserved BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (scope, period_start)
        );
        CREATE TABLE usage (
            request_id TEXT PRIMARY KEY,
            ts_ms BIGINT NOT NULL,
            key_id TEXT,
            tenant_id TEXT,
            model TEXT NOT NULL,
            deployment TEXT,
            provider TEXT,
            endpoint TEXT NOT NULL,
            stream BIGINT NOT NULL,
            tokens_in BIGINT NOT NULL,
            tokens_out BIGINT NOT NULL,
            estimated BIGINT NOT NULL,
            cost_micros BIGINT NOT NULL,
            latency_ms BIGINT NOT NULL,
            status BIGINT NOT NULL,
            error TEXT
        );
        CREATE INDEX usage_ts ON usage (ts_ms);
        CREATE INDEX usage_key_ts ON usage (key_id, ts_ms);
        CREATE TABLE alerts (
            scope TEXT NOT NULL,
            period_start BIGINT NOT NULL,
            threshold BIGINT NOT NULL,
            ts_ms BIGINT NOT NULL,
            PRIMARY KEY (scope, period_start, threshold)
        );
        CREATE TABLE audit (
            id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            ts_ms BIGINT NOT NULL,
            actor TEXT,
            action TEXT NOT NULL,
            target TEXT,
            ip TEXT,
            detail TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX audit_ts ON audit (ts_ms);
        """,
    ),
    # 2: federation: peers, invites, join requests awaiting approval, node-wide counters
    Migration(
        sqlite="""
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
        postgres="""
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
            listed BIGINT NOT NULL DEFAULT 0,
            created_at BIGINT NOT NULL,
            revoked_at BIGINT
        );
        CREATE TABLE invites (
            token_id TEXT PRIMARY KEY,
            public_key BYTEA NOT NULL,
            exp BIGINT NOT NULL,
            uses_left BIGINT NOT NULL,
            models TEXT NOT NULL,
            cap_micros BIGINT,
            cap_period TEXT NOT NULL,
            created_at BIGINT NOT NULL
        );
        CREATE TABLE join_requests (
            node_id TEXT PRIMARY KEY,
            descriptor TEXT NOT NULL,
            received_at BIGINT NOT NULL
        );
        CREATE TABLE counters (
            name TEXT PRIMARY KEY,
            value BIGINT NOT NULL
        );
        """,
    ),
    # 3: answers to approved join requests (the key inside is sealed to the joiner), and the
    # health a node last saw of each peer (for `aihub peers list`)
    Migration(
        sqlite="""
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
        postgres="""
        CREATE TABLE join_answers (
            node_id TEXT PRIMARY KEY,
            answer TEXT NOT NULL,
            created_at BIGINT NOT NULL
        );
        CREATE TABLE peer_health (
            node_id TEXT PRIMARY KEY,
            healthy BIGINT NOT NULL,
            latency_ms BIGINT,
            checked_at BIGINT NOT NULL
        );
        """,
    ),
    # 4: the ledger. Receipts are append-only: one chain per (provider, consumer) pair; the
    # only change a row ever gets is its countersignature, once. Statements (the
    # `settlements` table) close a period between two nodes.
    Migration(
        sqlite="""
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
        postgres="""
        CREATE TABLE receipts (
            provider TEXT NOT NULL,
            consumer TEXT NOT NULL,
            seq BIGINT NOT NULL,
            id TEXT NOT NULL,
            hash TEXT NOT NULL,
            amount BIGINT NOT NULL,
            iat BIGINT NOT NULL,
            body TEXT NOT NULL,
            csig TEXT,
            csig_sent BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (provider, consumer, seq)
        );
        CREATE INDEX receipts_id ON receipts (provider, consumer, id);
        CREATE INDEX receipts_iat ON receipts (iat);
        CREATE FUNCTION receipts_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'DELETE' THEN
                RAISE EXCEPTION 'receipts are append-only';
            END IF;
            IF (NEW.provider, NEW.consumer, NEW.seq, NEW.id, NEW.hash, NEW.amount, NEW.iat,
                NEW.body) IS DISTINCT FROM (OLD.provider, OLD.consumer, OLD.seq, OLD.id,
                OLD.hash, OLD.amount, OLD.iat, OLD.body) THEN
                RAISE EXCEPTION 'receipts are append-only';
            END IF;
            IF OLD.csig IS NOT NULL AND NEW.csig IS DISTINCT FROM OLD.csig THEN
                RAISE EXCEPTION 'a countersignature is written once';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER receipts_append_only BEFORE UPDATE OR DELETE ON receipts
            FOR EACH ROW EXECUTE FUNCTION receipts_append_only();
        CREATE TABLE equivocations (
            provider TEXT NOT NULL,
            consumer TEXT NOT NULL,
            seq BIGINT NOT NULL,
            ours TEXT NOT NULL,
            theirs TEXT NOT NULL,
            found_at BIGINT NOT NULL,
            PRIMARY KEY (provider, consumer, seq)
        );
        CREATE TABLE settlements (
            a TEXT NOT NULL,
            b TEXT NOT NULL,
            to_seq BIGINT NOT NULL,
            iat BIGINT NOT NULL,
            body TEXT NOT NULL,
            PRIMARY KEY (a, b, iat)
        );
        """,
    ),
    # 5 (books-intake): what a consumer routed to a peer: the request a receipt from that
    # peer may bill (DESIGN.md, "Who may hand a node a receipt"), written in the batch that
    # writes the request's usage record (a table of its own: local requests pay nothing).
    Migration(
        sqlite="""
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
        postgres="""
        CREATE TABLE peer_requests (
            request_id TEXT PRIMARY KEY,
            peer_id TEXT NOT NULL,
            model TEXT NOT NULL,
            price_seq BIGINT NOT NULL,
            price_in BIGINT NOT NULL,
            price_out BIGINT NOT NULL,
            status BIGINT NOT NULL
        );
        -- Receipts taken before this rule stay takeable (e.g. back from the peer after a restore):
        -- their requests' records are filled in from the receipt of the peer the usage record
        -- names (deployment `model@peer name`), with no price ceiling (2^53 - 1: the prices were
        -- not recorded). Receipts naming requests we never routed to their provider get none.
        INSERT INTO peer_requests
        SELECT u.request_id, r.provider, r.body::json ->> 'model',
            (r.body::json ->> 'price_seq')::bigint, 9007199254740991, 9007199254740991, u.status
        FROM usage u JOIN receipts r ON r.id = u.request_id
            JOIN peers p ON p.node_id = r.provider
        WHERE u.provider = 'peer'
            AND u.deployment = (r.body::json ->> 'model') || '@' || p.name
        ON CONFLICT DO NOTHING;
        """,
    ),
    # 6 (branch pipeline-caps): what a request really cost beyond what was charged (the charge
    # never passes the reservation), and whether its token counts were clamped (untrusted).
    Migration(
        sqlite="""
        ALTER TABLE usage ADD COLUMN unbilled_micros INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE usage ADD COLUMN clamped INTEGER NOT NULL DEFAULT 0;
        """,
        postgres="""
        ALTER TABLE usage ADD COLUMN unbilled_micros BIGINT NOT NULL DEFAULT 0;
        ALTER TABLE usage ADD COLUMN clamped BIGINT NOT NULL DEFAULT 0;
        """,
    ),
    # 7 (restore detection): which database file this is (device and inode: a restored backup
    # is another file), and the peers whose chains must be re-synced from their copies before
    # we issue them another receipt (filled in when the file is not the one we last ran on).
    Migration(
        sqlite="""
        CREATE TABLE node_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
        CREATE TABLE resync_pending (peer_id TEXT PRIMARY KEY) WITHOUT ROWID;
        """,
        postgres="""
        CREATE TABLE node_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE resync_pending (peer_id TEXT PRIMARY KEY);
        """,
    ),
    # 8 (conn-hardening): where each join request without an invite came from, so that one
    # address can hold only a few of the pending places
    Migration(
        sqlite="""
        ALTER TABLE join_requests ADD COLUMN source TEXT NOT NULL DEFAULT '';
        """,
        postgres="""
        ALTER TABLE join_requests ADD COLUMN source TEXT NOT NULL DEFAULT '';
        """,
    ),
    # 9 (branch replay-limits): what must hold across restarts and every process of a node.
    # Nonces seen (request signatures, join proofs), each kept until what carried it could no
    # longer be accepted; requests admitted per scope and second (rpm) and tokens used (tpm);
    # the parallel slots each live process holds per scope, with an expiry it keeps renewing,
    # so that the slots of a process that died come back.
    Migration(
        sqlite="""
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
        postgres="""
        CREATE TABLE nonces (
            pair BYTEA PRIMARY KEY,
            expires BIGINT NOT NULL
        );
        CREATE INDEX nonces_expires ON nonces (expires);
        CREATE TABLE rate_counts (
            scope TEXT NOT NULL,
            kind TEXT NOT NULL,
            second BIGINT NOT NULL,
            amount BIGINT NOT NULL,
            PRIMARY KEY (scope, kind, second)
        );
        CREATE INDEX rate_counts_second ON rate_counts (second);
        CREATE TABLE parallel_slots (
            scope TEXT NOT NULL,
            holder TEXT NOT NULL,
            slots BIGINT NOT NULL,
            expires BIGINT NOT NULL,
            PRIMARY KEY (scope, holder)
        );
        """,
    ),
    # 10 (branch responses): Responses API answers kept for the key that made them.
    Migration(
        sqlite="""
        CREATE TABLE responses (
            id TEXT PRIMARY KEY,
            key_id TEXT NOT NULL,
            created_ms INTEGER NOT NULL,
            response BLOB NOT NULL,
            input_items BLOB NOT NULL,
            context BLOB NOT NULL
        ) WITHOUT ROWID;
        """,
        postgres="""
        CREATE TABLE responses (
            id TEXT PRIMARY KEY,
            key_id TEXT NOT NULL,
            created_ms BIGINT NOT NULL,
            response BYTEA NOT NULL,
            input_items BYTEA NOT NULL,
            context BYTEA NOT NULL
        );
        """,
    ),
    # 11 (postgres): every process of the node hears at once that keys, tenants or peers
    # changed, whoever changed them (another host, the CLI): a notification at each commit
    # that changes them. SQLite: nothing (one host: the data folder's epoch files tell).
    Migration(
        sqlite="""
        SELECT 1;
        """,
        postgres="""
        CREATE FUNCTION aihub_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('aihub_changes', TG_ARGV[0]);
            RETURN NULL;
        END $$;
        CREATE TRIGGER keys_changed AFTER INSERT OR UPDATE OR DELETE ON keys
            FOR EACH STATEMENT EXECUTE FUNCTION aihub_notify_change('keys');
        CREATE TRIGGER tenants_changed AFTER INSERT OR UPDATE OR DELETE ON tenants
            FOR EACH STATEMENT EXECUTE FUNCTION aihub_notify_change('keys');
        CREATE TRIGGER peers_changed AFTER INSERT OR UPDATE OR DELETE ON peers
            FOR EACH STATEMENT EXECUTE FUNCTION aihub_notify_change('peers');
        """,
    ),
    # 12: what each process holds reserved of each budget, with an expiry it keeps
    # renewing, so that what a killed process held is given back by the others (its
    # completed requests, replayed from its journal later, then add their spend only).
    Migration(
        sqlite="""
        CREATE TABLE budget_holds (
            scope TEXT NOT NULL,
            period_start INTEGER NOT NULL,
            holder TEXT NOT NULL,
            amount INTEGER NOT NULL,
            expires INTEGER NOT NULL,
            PRIMARY KEY (scope, period_start, holder)
        ) WITHOUT ROWID;
        CREATE INDEX budget_holds_expires ON budget_holds (expires);
        """,
        postgres="""
        CREATE TABLE budget_holds (
            scope TEXT NOT NULL,
            period_start BIGINT NOT NULL,
            holder TEXT NOT NULL,
            amount BIGINT NOT NULL,
            expires BIGINT NOT NULL,
            PRIMARY KEY (scope, period_start, holder)
        );
        CREATE INDEX budget_holds_expires ON budget_holds (expires);
        """,
    ),
    # 13: the dashboard's sign-in sessions, by the hash of their cookie (a leaked database
    # holds no cookie), each with its CSRF token and an expiry; a session names the admin key
    # it was opened with, so revoking the key ends it.
    Migration(
        sqlite="""
        CREATE TABLE ui_sessions (
            id_hash BLOB PRIMARY KEY,
            key_id TEXT NOT NULL,
            csrf TEXT NOT NULL,
            created_ms INTEGER NOT NULL,
            expires_ms INTEGER NOT NULL
        ) WITHOUT ROWID;
        CREATE INDEX ui_sessions_expires ON ui_sessions (expires_ms);
        """,
        postgres="""
        CREATE TABLE ui_sessions (
            id_hash BYTEA PRIMARY KEY,
            key_id TEXT NOT NULL,
            csrf TEXT NOT NULL,
            created_ms BIGINT NOT NULL,
            expires_ms BIGINT NOT NULL
        );
        CREATE INDEX ui_sessions_expires ON ui_sessions (expires_ms);
        """,
    ),
    # 14: the response cache's answers, per scope (a tenant's or a key's) and digest of the
    # canonical request, with their expiry and last use (LRU); and whether a usage record was
    # answered from it.
    Migration(
        sqlite="""
        CREATE TABLE response_cache (
            scope TEXT NOT NULL,
            digest BLOB NOT NULL,
            created_ms INTEGER NOT NULL,
            expires_ms INTEGER NOT NULL,
            used_ms INTEGER NOT NULL,
            answer BLOB NOT NULL,
            PRIMARY KEY (scope, digest)
        );
        CREATE INDEX response_cache_used ON response_cache (used_ms);
        CREATE INDEX response_cache_expires ON response_cache (expires_ms);
        ALTER TABLE usage ADD COLUMN cache_hit INTEGER NOT NULL DEFAULT 0;
        """,
        postgres="""
        CREATE TABLE response_cache (
            scope TEXT NOT NULL,
            digest BYTEA NOT NULL,
            created_ms BIGINT NOT NULL,
            expires_ms BIGINT NOT NULL,
            used_ms BIGINT NOT NULL,
            answer BYTEA NOT NULL,
            PRIMARY KEY (scope, digest)
        );
        CREATE INDEX response_cache_used ON response_cache (used_ms);
        CREATE INDEX response_cache_expires ON response_cache (expires_ms);
        ALTER TABLE usage ADD COLUMN cache_hit BIGINT NOT NULL DEFAULT 0;
        """,
    ),
    # 15: interaction logs, one per logged request (its bodies, what served it, what it cost,
    # the guardrails' findings), by request id, which the usage record names (`log_id`).
    Migration(
        sqlite="""
        CREATE TABLE interaction_logs (
            request_id TEXT PRIMARY KEY,
            ts_ms INTEGER NOT NULL,
            key_id TEXT,
            tenant_id TEXT,
            model TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            deployment TEXT,
            peer TEXT,
            stream INTEGER NOT NULL,
            status INTEGER NOT NULL,
            tokens_in INTEGER NOT NULL,
            tokens_out INTEGER NOT NULL,
            cost_micros INTEGER NOT NULL,
            latency_ms INTEGER NOT NULL,
            cache_hit INTEGER NOT NULL,
            error TEXT,
            request BLOB NOT NULL,
            response BLOB NOT NULL,
            findings BLOB NOT NULL,
            truncated INTEGER NOT NULL,
            size INTEGER NOT NULL
        );
        CREATE INDEX interaction_logs_ts ON interaction_logs (ts_ms);
        CREATE INDEX interaction_logs_key ON interaction_logs (key_id, ts_ms);
        CREATE INDEX interaction_logs_tenant ON interaction_logs (tenant_id, ts_ms);
        ALTER TABLE usage ADD COLUMN log_id TEXT;
        """,
        postgres="""
        CREATE TABLE interaction_logs (
            request_id TEXT PRIMARY KEY,
            ts_ms BIGINT NOT NULL,
            key_id TEXT,
            tenant_id TEXT,
            model TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            deployment TEXT,
            peer TEXT,
            stream BIGINT NOT NULL,
            status BIGINT NOT NULL,
            tokens_in BIGINT NOT NULL,
            tokens_out BIGINT NOT NULL,
            cost_micros BIGINT NOT NULL,
            latency_ms BIGINT NOT NULL,
            cache_hit BIGINT NOT NULL,
            error TEXT,
            request BYTEA NOT NULL,
            response BYTEA NOT NULL,
            findings BYTEA NOT NULL,
            truncated BIGINT NOT NULL,
            size BIGINT NOT NULL
        );
        CREATE INDEX interaction_logs_ts ON interaction_logs (ts_ms);
        CREATE INDEX interaction_logs_key ON interaction_logs (key_id, ts_ms);
        CREATE INDEX interaction_logs_tenant ON interaction_logs (tenant_id, ts_ms);
        ALTER TABLE usage ADD COLUMN log_id TEXT;
        """,
    ),
    # 16: the processes serving the node, each with its heartbeat (in the database's clock)
    # and the change epoch of keys and tenants it checks requests against, so that a command
    # that changes a key returns once every live process has applied it; the epoch is
    # counted by the database at each change (`counters` row `changes`), whoever made it.
    Migration(
        sqlite="""
        CREATE TABLE processes (
            holder TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            folder TEXT NOT NULL,
            path TEXT NOT NULL,
            seen_ms INTEGER NOT NULL,
            applied INTEGER NOT NULL
        ) WITHOUT ROWID;
        CREATE TRIGGER keys_epoch_insert AFTER INSERT ON keys BEGIN
            INSERT INTO counters VALUES ('changes', 1)
                ON CONFLICT (name) DO UPDATE SET value = value + 1;
        END;
        CREATE TRIGGER keys_epoch_update AFTER UPDATE ON keys BEGIN
            INSERT INTO counters VALUES ('changes', 1)
                ON CONFLICT (name) DO UPDATE SET value = value + 1;
        END;
        CREATE TRIGGER keys_epoch_delete AFTER DELETE ON keys BEGIN
            INSERT INTO counters VALUES ('changes', 1)
                ON CONFLICT (name) DO UPDATE SET value = value + 1;
        END;
        CREATE TRIGGER tenants_epoch_insert AFTER INSERT ON tenants BEGIN
            INSERT INTO counters VALUES ('changes', 1)
                ON CONFLICT (name) DO UPDATE SET value = value + 1;
        END;
        CREATE TRIGGER tenants_epoch_update AFTER UPDATE ON tenants BEGIN
            INSERT INTO counters VALUES ('changes', 1)
                ON CONFLICT (name) DO UPDATE SET value = value + 1;
        END;
        CREATE TRIGGER tenants_epoch_delete AFTER DELETE ON tenants BEGIN
            INSERT INTO counters VALUES ('changes', 1)
                ON CONFLICT (name) DO UPDATE SET value = value + 1;
        END;
        """,
        postgres="""
        CREATE TABLE processes (
            holder TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            pid BIGINT NOT NULL,
            folder TEXT NOT NULL,
            path TEXT NOT NULL,
            seen_ms BIGINT NOT NULL,
            applied BIGINT NOT NULL
        );
        CREATE FUNCTION aihub_keys_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO counters VALUES ('changes', 1)
                ON CONFLICT (name) DO UPDATE SET value = counters.value + 1;
            PERFORM pg_notify('aihub_changes', 'keys');
            RETURN NULL;
        END $$;
        DROP TRIGGER keys_changed ON keys;
        DROP TRIGGER tenants_changed ON tenants;
        CREATE TRIGGER keys_changed AFTER INSERT OR UPDATE OR DELETE ON keys
            FOR EACH STATEMENT EXECUTE FUNCTION aihub_keys_changed();
        CREATE TRIGGER tenants_changed AFTER INSERT OR UPDATE OR DELETE ON tenants
            FOR EACH STATEMENT EXECUTE FUNCTION aihub_keys_changed();
        """,
    ),
    # 17: what two scheduled jobs look up, found by index rather than by reading a table
    # that grows for as long as the node runs. The countersignatures a consumer has still to
    # send (every 2 seconds): a partial index of only those rows (a provider marks the
    # countersignatures its consumers send it as nothing to send; what a provider stored
    # before this migration, or takes back countersigned in reconciliation, stays in it,
    # under its consumers' ids, which a consumer's look-up of its own never reads). The
    # interaction logs' sizes, newest first, for the prune that keeps them under
    # `max_bytes`: read from the index, never from the rows and their bodies; it replaces
    # the index on ts_ms alone, its prefix.
    Migration(
        sqlite="""
        CREATE INDEX receipts_unsent ON receipts (consumer, provider, seq)
            WHERE csig IS NOT NULL AND csig_sent = 0;
        CREATE INDEX interaction_logs_size ON interaction_logs (ts_ms, request_id, size);
        DROP INDEX interaction_logs_ts;
        """,
        postgres="""
        CREATE INDEX receipts_unsent ON receipts (consumer, provider, seq)
            WHERE csig IS NOT NULL AND csig_sent = 0;
        CREATE INDEX interaction_logs_size ON interaction_logs (ts_ms, request_id) INCLUDE (size);
        DROP INDEX interaction_logs_ts;
        """,
    ),
]
