#!/bin/sh
# Start one peer of compose.peers.yml (or any node that should peer up by itself at start-up).
#
#   1. create the node if its data folder is empty (`aihub init --if-missing`), keeping its
#      admin key in $AIHUB_HOME/admin.key (mode 0600) instead of printing it;
#   2. write its name, listening address, public URL, seeds and (optionally) an upstream model
#      into config.toml, and check the config (`aihub config check`);
#   3. start `aihub serve` in the foreground (it gets the container's signals), and in the
#      background:
#      - for each name in $AIHUB_INVITE, leave a fresh one-use invite in the shared folder:
#        $AIHUB_SHARED/invites/<this node>-for-<name>.token;
#      - once the node is ready, for each seed in $AIHUB_SEEDS, wait until it answers, learn
#        its name and node id from its descriptor (GET /federation/node), wait for the invite
#        it left for this node, and `aihub join` it. A join is done once per seed node id (a
#        marker in $AIHUB_HOME/joined/), so restarts do not join again.
#
# Environment (all optional):
#   AIHUB_HOME           data folder                          [/data]
#   AIHUB_NAME           node name                            [the host name]
#   AIHUB_HOST           interface to listen on               [0.0.0.0]
#   AIHUB_PORT           port to listen on                    [8787]
#   AIHUB_PUBLIC_URL     how peers reach this node            [http://$AIHUB_NAME:$AIHUB_PORT]
#   AIHUB_SEEDS          space-separated node URLs to join    []
#   AIHUB_INVITE         space-separated node names to invite []
#   AIHUB_SHARED         folder shared by the peers           [/shared]
#   AIHUB_UPSTREAM_URL   an OpenAI-compatible base URL to serve a model from, e.g.
#                        http://mock-upstream:9000/v1 (none: only the echo demo models)
#   AIHUB_UPSTREAM_MODEL the name to serve it under           [mock-gpt]
#   AIHUB_UPSTREAM_KEY   the upstream's API key, if it needs one (read from the environment
#                        by the node; never written to the config)
#   AIHUB_JOIN_TIMEOUT   seconds to keep trying each seed     [300]
set -eu

: "${AIHUB_HOME:=/data}"
: "${AIHUB_NAME:=$(hostname | cut -d. -f1)}"
: "${AIHUB_HOST:=0.0.0.0}"
: "${AIHUB_PORT:=8787}"
: "${AIHUB_PUBLIC_URL:=http://$AIHUB_NAME:$AIHUB_PORT}"
: "${AIHUB_SEEDS:=}"
: "${AIHUB_INVITE:=}"
: "${AIHUB_SHARED:=/shared}"
: "${AIHUB_UPSTREAM_URL:=}"
: "${AIHUB_UPSTREAM_MODEL:=mock-gpt}"
: "${AIHUB_JOIN_TIMEOUT:=300}"
export AIHUB_HOME
PYTHON=${PYTHON:-python3}
CONFIG="$AIHUB_HOME/config.toml"

log() { echo "[peer-entrypoint $AIHUB_NAME] $*" >&2; }

# set_key KEY VALUE: replace the first line of config.toml that starts with `KEY =` (the
# template has one such line per key used here), keeping the file's mode.
set_key() {
    awk -v key="$1" -v value="$2" '
        !done && index($0, key " = ") == 1 { print key " = " value; done = 1; next }
        { print }
        END { if (!done) exit 1 }
    ' "$CONFIG" >"$CONFIG.new" || { log "config.toml has no '$1 =' line"; exit 1; }
    cat "$CONFIG.new" >"$CONFIG"
    rm -f "$CONFIG.new"
}

# toml_list WORDS…: ["a", "b"]
toml_list() {
    out=""
    for item in "$@"; do out="$out${out:+, }\"$item\""; done
    echo "[$out]"
}

# http_get URL [FIELD]: the JSON field of a 2xx answer (or nothing); fails if none.
http_get() {
    "$PYTHON" - "$@" <<'EOF'
import json, sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=3) as answer:
        body = answer.read()
except Exception:
    sys.exit(1)
if len(sys.argv) > 2:
    print(json.loads(body)[sys.argv[2]])
EOF
}

# --- 1. the node ----------------------------------------------------------------------------
umask 077
if [ ! -e "$CONFIG" ]; then
    out=$(aihub init --if-missing --name "$AIHUB_NAME" --data-dir "$AIHUB_HOME")
    key=$(printf '%s\n' "$out" | grep -o 'sk-hub-[0-9a-f]*_[A-Za-z0-9_-]*' | head -n 1)
    printf '%s\n' "$key" >"$AIHUB_HOME/admin.key"
    log "created node $AIHUB_NAME; its admin key is in $AIHUB_HOME/admin.key"
fi

# --- 2. its config --------------------------------------------------------------------------
# shellcheck disable=SC2086  # word splitting of the lists is intended
set_key host "\"$AIHUB_HOST\""
set_key port "$AIHUB_PORT"
set_key public_urls "[\"$AIHUB_PUBLIC_URL\"]"
set_key seeds "$(toml_list $AIHUB_SEEDS)"
if [ -n "$AIHUB_UPSTREAM_URL" ] && ! grep -q "^name = \"$AIHUB_UPSTREAM_MODEL\"\$" "$CONFIG"; then
    {
        echo ""
        echo "# Added by peer-entrypoint.sh: a model served from an OpenAI-compatible upstream."
        echo "[[models]]"
        echo "name = \"$AIHUB_UPSTREAM_MODEL\""
        echo "provider = \"openai\""
        echo "base_url = \"$AIHUB_UPSTREAM_URL\""
        if [ -n "${AIHUB_UPSTREAM_KEY:-}" ]; then echo 'api_key_env = "AIHUB_UPSTREAM_KEY"'; fi
        echo "price_in = 500_000"
        echo "price_out = 1_500_000"
    } >>"$CONFIG"
fi
aihub config check --data-dir "$AIHUB_HOME"

# --- 3. peering, once the node is up --------------------------------------------------------
local_url="http://127.0.0.1:$AIHUB_PORT"

wait_ready() { # URL: wait until its /health/ready answers; fail after the join timeout
    waited=0
    until http_get "$1/health/ready"; do
        waited=$((waited + 1))
        [ "$waited" -le "$AIHUB_JOIN_TIMEOUT" ] || return 1
        sleep 1
    done
}

invite() { # NAME: a fresh one-use invite for NAME, written atomically
    mkdir -p "$AIHUB_SHARED/invites"
    file="$AIHUB_SHARED/invites/$AIHUB_NAME-for-$1.token"
    aihub invite create --uses 1 --expires 24h --data-dir "$AIHUB_HOME" >"$file.new"
    mv "$file.new" "$file"
    log "left an invite for $1 in $file"
}

join_seed() { # SEED: join the node at the seed's URL with the invite it left for us
    url=${1##*@} # a seed may pin the node's id: ed25519:…@http://host:port
    pin=""
    case $1 in *@*) pin=${1%@*} ;; esac
    wait_ready "$url" || { log "seed $url never answered"; return 1; }
    name=$(http_get "$url/federation/node" name) &&
        id=$(http_get "$url/federation/node" node_id) || {
        log "seed $url has no node descriptor"
        return 1
    }
    if [ -n "$pin" ] && [ "$pin" != "$id" ]; then
        log "seed $url is $id, not the pinned $pin: not joining"
        return 1
    fi
    marker="$AIHUB_HOME/joined/$id"
    if [ -e "$marker" ]; then
        log "already joined $name ($id)"
        return 0
    fi
    token="$AIHUB_SHARED/invites/$name-for-$AIHUB_NAME.token"
    waited=0
    while :; do
        if [ -s "$token" ] && aihub join "$(cat "$token")" --data-dir "$AIHUB_HOME"; then
            mkdir -p "$AIHUB_HOME/joined"
            echo "$url" >"$marker"
            log "joined $name ($id) at $url"
            return 0
        fi
        waited=$((waited + 1))
        if [ "$waited" -gt "$AIHUB_JOIN_TIMEOUT" ]; then
            log "no usable invite from $name in $token after ${AIHUB_JOIN_TIMEOUT}s"
            return 1
        fi
        sleep 1
    done
}

peer_up() {
    # Invites live in the data folder: they can be written while the node starts.
    for name in $AIHUB_INVITE; do invite "$name"; done
    wait_ready "$local_url" || { log "this node never became ready"; return 1; }
    status=0
    for seed in $AIHUB_SEEDS; do join_seed "$seed" || status=1; done
    log "peering done"
    return "$status"
}

if [ -n "$AIHUB_INVITE$AIHUB_SEEDS" ]; then
    peer_up &
fi
exec aihub serve --host "$AIHUB_HOST" --port "$AIHUB_PORT" --data-dir "$AIHUB_HOME"
