#!/usr/bin/env bash
# schemathesis against the daemon tests/support/with-daemon.sh started (its
# variables in the environment), then tests/openapi/statuses.py: every
# documented status reached. Run through tests/openapi/run.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=target/schemathesis-venv
out=target/openapi
rm -rf "$out" && mkdir -p "$out"
# A fixed seed by default, so that a CI run is repeatable; SCHEMATHESIS_SEED
# picks another (schemathesis prints the one it used).
"$venv/bin/schemathesis" --config-file tests/openapi/schemathesis.toml run \
    "$SCRAMJET_URL/openapi.json" \
    --header "Authorization: Bearer $SCRAMJET_TOKEN" \
    --seed "${SCHEMATHESIS_SEED:-20261202}" \
    --report har --report-har-path "$out/schemathesis.har" \
    --report junit --report-junit-path "$out/schemathesis.xml"
"$venv/bin/python" tests/openapi/statuses.py "$out/schemathesis.har"
