#!/usr/bin/env bash
# Starts a Scramjet daemon of its own with a little data loaded, runs a
# command against it, and removes everything again:
#
#   tests/support/with-daemon.sh <command> [args...]
#
# Run from anywhere; the command runs in the repository root with the
# variables below exported, and its exit status is this script's. Needs
# PostgreSQL and RabbitMQ as deploy/dev-services.sh sets them up (override
# with SCRAMJET_TEST_POSTGRES and SCRAMJET_TEST_AMQP, as the Rust tests do),
# and curl, psql, python3 or node, and rabbitmqctl (as root or through sudo)
# to delete the queues and exchanges afterwards.
#
# The daemon: the binary of `cargo build --bin scramjet` (debug; set
# SCRAMJET_BIN to use another and skip the build), a database
# scramjet_browser_<random> and exchanges and queues test-browser-<random>.*
# of its own, HTTP on a free loopback port with a bearer token, and a schema
# directory holding one strict schema. Loaded before the command runs (and
# seen through the API): three saves of type console_person, whose schema
# requires "name", a string:
#
#   SCRAMJET_ID               {"title": "x"}: rejected ("name" is missing);
#                             SCRAMJET_FIXED_SCHEMA accepts it
#   SCRAMJET_STILL_INVALID_ID {"name": 42}: rejected, by the fixed schema too
#   SCRAMJET_VALID_ID         {"name": "Ada Lovelace"}: a resource
#
# Exported to the command:
#   SCRAMJET_URL          http://127.0.0.1:<port> (no trailing slash)
#   SCRAMJET_TOKEN        the bearer token of every /v1 request
#   SCRAMJET_TYPE         console_person
#   SCRAMJET_ID, SCRAMJET_STILL_INVALID_ID, SCRAMJET_VALID_ID   as above
#   SCRAMJET_DATA         the data of SCRAMJET_ID (JSON)
#   SCRAMJET_ERROR_TEXT   a word of SCRAMJET_ID's validation error
#   SCRAMJET_SCHEMA_DIR   the daemon's validation.schema_dir
#   SCRAMJET_SCHEMA_FILE  $SCRAMJET_SCHEMA_DIR/console_person.json
#   SCRAMJET_FIXED_SCHEMA a schema for it without "required"
#   SCRAMJET_CONFIG       the daemon's configuration file (for `scramjet --config`)
#   SCRAMJET_BIN          the scramjet binary
#   SCRAMJET_LOG          the daemon's log file
#   SCRAMJET_WORK_DIR     a temporary directory, removed afterwards
#
# On exit (also on failure or Ctrl-C) the daemon gets SIGTERM, and the
# database, queues, exchanges and temporary directory are removed; when the
# command failed, the end of the daemon's log is printed first.
set -euo pipefail

say() { echo "with-daemon: $*" >&2; }
die() { say "$*"; exit 1; }

[ "$#" -gt 0 ] || die "usage: $0 <command> [args...]"
cd "$(dirname "$0")/../.."

for tool in curl psql; do
    command -v "$tool" >/dev/null || die "$tool is needed (apt-get install curl postgresql-client)"
done
if command -v python3 >/dev/null; then
    json_tool=python3
elif command -v node >/dev/null; then
    json_tool=node
else
    die "python3 or node is needed to read the API's JSON"
fi

postgres_base=${SCRAMJET_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432}
amqp_url=${SCRAMJET_TEST_AMQP:-amqp://guest:guest@127.0.0.1:5672/%2f}

if [ -z "${SCRAMJET_BIN:-}" ]; then
    say "building the daemon (cargo build --bin scramjet)"
    cargo build --quiet --bin scramjet
    SCRAMJET_BIN="${CARGO_TARGET_DIR:-target}/debug/scramjet"
fi
[ -x "$SCRAMJET_BIN" ] || die "no executable $SCRAMJET_BIN"
SCRAMJET_BIN=$(cd "$(dirname "$SCRAMJET_BIN")" && pwd)/$(basename "$SCRAMJET_BIN")

random_hex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }
suffix=$(random_hex 6)
database="scramjet_browser_$suffix"
prefix="test-browser-$suffix"
token=$(random_hex 16)

if [ "$(id -u)" -eq 0 ]; then
    as_root() { "$@"; }
elif command -v sudo >/dev/null; then
    as_root() { sudo -n "$@"; }
else
    as_root() { "$@"; }
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/scramjet-with-daemon.XXXXXX")
daemon_pid=""

stop_daemon() {
    [ -n "$daemon_pid" ] || return 0
    if kill -0 "$daemon_pid" 2>/dev/null; then
        kill -TERM "$daemon_pid" 2>/dev/null || true
        local i
        for ((i = 0; i < 300; i++)); do
            kill -0 "$daemon_pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$daemon_pid" 2>/dev/null; then
            say "the daemon did not stop within 30 s of SIGTERM; killing it"
            kill -KILL "$daemon_pid" 2>/dev/null || true
        fi
    fi
    wait "$daemon_pid" 2>/dev/null || true
    daemon_pid=""
}

remove_broker_objects() {
    if ! command -v rabbitmqctl >/dev/null && [ ! -x /usr/sbin/rabbitmqctl ]; then
        say "no rabbitmqctl: queues and exchanges $prefix.* are left on the broker"
        return 0
    fi
    local ctl name
    ctl=$(command -v rabbitmqctl || echo /usr/sbin/rabbitmqctl)
    # Every queue and exchange named after the prefix, whatever declared it.
    while read -r name; do
        [ -n "$name" ] || continue
        as_root "$ctl" -q delete_queue "$name" </dev/null >/dev/null 2>&1 || say "cannot delete queue $name"
    done < <(as_root "$ctl" -q list_queues --no-table-headers name 2>/dev/null | grep -F "$prefix.")
    # rabbitmqctl has no delete_exchange; the broker's own function does it.
    while read -r name; do
        [ -n "$name" ] || continue
        as_root "$ctl" -q eval \
            "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$name\">>), false, <<\"with-daemon\">>)." \
            </dev/null >/dev/null 2>&1 || say "cannot delete exchange $name"
    done < <(as_root "$ctl" -q list_exchanges --no-table-headers name 2>/dev/null | grep -F "$prefix.")
    local left
    left=$( (as_root "$ctl" -q list_queues --no-table-headers name
        as_root "$ctl" -q list_exchanges --no-table-headers name) 2>/dev/null </dev/null | grep -F "$prefix." | tr '\n' ' ')
    [ -z "$left" ] || say "left on the broker: $left"
}

cleanup() {
    local status=$?
    set +e
    stop_daemon
    if [ "$status" -ne 0 ] && [ -s "$work/daemon.log" ]; then
        say "failed (status $status); the daemon's log ends with:"
        tail -n 200 "$work/daemon.log" >&2
    fi
    psql -w -X -q "$postgres_base/postgres" -c "DROP DATABASE IF EXISTS \"$database\" WITH (FORCE)" \
        </dev/null >/dev/null 2>&1 || say "cannot drop database $database"
    remove_broker_objects
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A free loopback port: bound, read and released (the daemon binds it next;
# in the rare case something else takes it first, /readyz never answers).
free_port() {
    if [ "$json_tool" = python3 ]; then
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
    else
        node -e 'const s = require("net").createServer(); s.listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close(); })'
    fi
}
port=$(free_port)
url="http://127.0.0.1:$port"

schema_dir="$work/schemas"
mkdir -p "$schema_dir"
cat >"$schema_dir/console_person.json" <<'EOF'
{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "title": "console_person (strict)",
  "type": "object",
  "required": ["name"],
  "properties": {
    "name": { "type": "string", "minLength": 1 }
  }
}
EOF
fixed_schema='{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "title": "console_person (name optional)",
  "type": "object",
  "properties": {
    "name": { "type": "string", "minLength": 1 }
  }
}'

config="$work/scramjet.toml"
cat >"$config" <<EOF
[postgres]
url = "$postgres_base/$database"

[amqp]
url = "$amqp_url"
inbound_exchange = "$prefix.inbound"
inbound_queue = "$prefix.inbound"
changes_exchange = "$prefix.changes"
dead_letter_exchange = "$prefix.dead"
dead_letter_queue = "$prefix.dead"

[validation]
schema_dir = "$schema_dir"

[http]
listen = "127.0.0.1:$port"
bearer_token = "$token"

[shutdown]
timeout = "10s"
EOF

say "starting the daemon on $url (database $database, names $prefix.*)"
NO_COLOR=1 "$SCRAMJET_BIN" --config "$config" run >"$work/daemon.log" 2>&1 &
daemon_pid=$!

ready=""
for ((i = 0; i < 600; i++)); do
    kill -0 "$daemon_pid" 2>/dev/null || die "the daemon exited before it was ready"
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "$url/readyz" 2>/dev/null)" = 200 ]; then
        ready=1
        break
    fi
    sleep 0.1
done
[ -n "$ready" ] || die "the daemon was not ready within 60 s"

type=console_person
id="ada/1 O'Brien"
data='{"title": "x"}'
still_invalid_id="bad-2"
valid_id="valid-1"

send_save() { # id data
    "$SCRAMJET_BIN" --config "$config" send save --type "$type" --id "$1" --data "$2" >>"$work/send.log" 2>&1 \
        || { cat "$work/send.log" >&2; die "scramjet send failed"; }
}
send_save "$id" "$data"
send_save "$still_invalid_id" '{"name": 42}'
send_save "$valid_id" '{"name": "Ada Lovelace"}'

# "<resources> <staging_invalid>" of a type in v1/types ("0 0" when absent).
type_counts() {
    local body
    body=$(curl -fsS -H "Authorization: Bearer $token" "$url/v1/types") || return 1
    if [ "$json_tool" = python3 ]; then
        python3 -c 'import json, sys
items = [t for t in json.load(sys.stdin)["items"] if t["type"] == sys.argv[1]]
print(items[0]["resources"], items[0]["staging_invalid"]) if items else print(0, 0)' "$1" <<<"$body"
    else
        node -e 'let s = ""; process.stdin.on("data", (d) => s += d).on("end", () => {
const t = JSON.parse(s).items.find((t) => t.type === process.argv[1]);
console.log(t ? `${t.resources} ${t.staging_invalid}` : "0 0"); })' "$1" <<<"$body"
    fi
}
counts=""
for ((i = 0; i < 300; i++)); do
    counts=$(type_counts "$type" || true)
    [ "$counts" = "1 2" ] && break
    sleep 0.1
done
[ "$counts" = "1 2" ] || die "v1/types did not show 1 resource and 2 rejected of $type within 30 s (last: ${counts:-no answer})"

export SCRAMJET_URL="$url" SCRAMJET_TOKEN="$token" SCRAMJET_TYPE="$type" \
    SCRAMJET_ID="$id" SCRAMJET_STILL_INVALID_ID="$still_invalid_id" SCRAMJET_VALID_ID="$valid_id" \
    SCRAMJET_DATA="$data" SCRAMJET_ERROR_TEXT="name" \
    SCRAMJET_SCHEMA_DIR="$schema_dir" SCRAMJET_SCHEMA_FILE="$schema_dir/$type.json" \
    SCRAMJET_FIXED_SCHEMA="$fixed_schema" SCRAMJET_CONFIG="$config" SCRAMJET_BIN="$SCRAMJET_BIN" \
    SCRAMJET_LOG="$work/daemon.log" SCRAMJET_WORK_DIR="$work"

say "running: $*"
status=0
"$@" || status=$?
exit "$status"
