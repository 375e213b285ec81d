#!/bin/sh
# One node on several replicas sharing PostgreSQL (deploy/compose.postgres.yml).
#
#   replica-entrypoint.sh setup   once: create the node in the shared folder $AIHUB_NODE
#                                 (identity, config, admin key in admin.key, mode 0600), point
#                                 its [storage] at $AIHUB_DB_URL and copy its store there
#                                 (`aihub db copy`), unless that was done already;
#   replica-entrypoint.sh serve   each replica: its own data folder with the node's identity
#                                 and config copied in, then `aihub serve` in the foreground.
#
# Environment:
#   AIHUB_NODE          the folder the replicas share, read-only for them   [/node]
#   AIHUB_HOME          this replica's own data folder (its journal)        [/data]
#   AIHUB_NAME          the node's name                                     [aihub]
#   AIHUB_DB_URL        postgresql://user@host:port/database (no password)
#   AIHUB_DB_PASSWORD   its password (read by the node from the environment)
#   AIHUB_PUBLIC_URL    how clients and peers reach the node: the proxy     [http://localhost:8080]
set -eu

: "${AIHUB_NODE:=/node}"
: "${AIHUB_HOME:=/data}"
: "${AIHUB_NAME:=aihub}"
: "${AIHUB_PUBLIC_URL:=http://localhost:8080}"
: "${AIHUB_DB_URL:?set AIHUB_DB_URL}"
export AIHUB_HOME
umask 077

log() { echo "[replica-entrypoint] $*" >&2; }

# set_key FILE KEY VALUE: replace the first line of FILE that starts with `KEY =`.
set_key() {
    awk -v key="$2" -v value="$3" '
        !done && index($0, key " = ") == 1 { print key " = " value; done = 1; next }
        { print }
        END { if (!done) exit 1 }
    ' "$1" >"$1.new" || { log "$1 has no '$2 =' line"; exit 1; }
    cat "$1.new" >"$1"
    rm -f "$1.new"
}

setup() {
    if [ -e "$AIHUB_NODE/copied" ]; then
        log "the node is in PostgreSQL already"
        return
    fi
    if [ ! -e "$AIHUB_NODE/config.toml" ]; then
        out=$(aihub init --if-missing --name "$AIHUB_NAME" --data-dir "$AIHUB_NODE")
        printf '%s\n' "$out" | grep -o 'sk-hub-[0-9a-f]*_[A-Za-z0-9_-]*' | head -n 1 \
            >"$AIHUB_NODE/admin.key"
        log "created node $AIHUB_NAME; its admin key is in $AIHUB_NODE/admin.key"
    fi
    config="$AIHUB_NODE/config.toml"
    set_key "$config" host '"0.0.0.0"'
    set_key "$config" public_urls "[\"$AIHUB_PUBLIC_URL\"]"
    aihub db copy --to "$AIHUB_DB_URL" --password-env AIHUB_DB_PASSWORD --data-dir "$AIHUB_NODE"
    set_key "$config" url "\"$AIHUB_DB_URL\""
    sed -i 's/^# password_env = .*/password_env = "AIHUB_DB_PASSWORD"/' "$config"
    aihub config check --data-dir "$AIHUB_NODE"
    touch "$AIHUB_NODE/copied"
}

serve() {
    cp "$AIHUB_NODE/identity.key" "$AIHUB_NODE/config.toml" "$AIHUB_HOME/"
    exec aihub serve --data-dir "$AIHUB_HOME"
}

case "${1:-serve}" in
    setup) setup ;;
    serve) serve ;;
    *) log "usage: $0 setup|serve"; exit 2 ;;
esac
