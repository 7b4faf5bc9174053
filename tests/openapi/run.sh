#!/usr/bin/env bash
# The HTTP API against its own OpenAPI description: schemathesis (from PyPI,
# installed by deploy/schemathesis-deps.sh into target/schemathesis-venv)
# fuzzes every operation of /openapi.json on a daemon of its own with a
# little data loaded, and tests/openapi/statuses.py makes sure each status
# the description documents is reached. Reports go to target/openapi/.
set -euo pipefail
cd "$(dirname "$0")/../.."
deploy/schemathesis-deps.sh
# Short enough for statuses.py to provoke the read API's 503s quickly.
export SCRAMJET__HTTP__STATEMENT_TIMEOUT=1s SCRAMJET__HTTP__MAX_EVENT_STREAMS=2
exec tests/support/with-daemon.sh tests/openapi/check.sh
