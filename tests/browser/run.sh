#!/usr/bin/env bash
# The browser test of the console: a daemon of its own with rejected records
# (tests/support/with-daemon.sh), then tests/browser/console.mjs drives the
# system's Chromium through /ui behind a path prefix. Run from anywhere after
# deploy/browser-deps.sh (Chromium, Node.js, node_modules) and
# deploy/dev-services.sh (PostgreSQL, RabbitMQ). The screenshot goes to
# $SCRAMJET_SCREENSHOT (default target/browser/console.png).
set -euo pipefail
cd "$(dirname "$0")/../.."

[ -d tests/browser/node_modules/playwright-core ] \
    || { echo "browser test: run deploy/browser-deps.sh first (no tests/browser/node_modules)" >&2; exit 1; }
[ -x "${CHROMIUM:-/usr/bin/chromium}" ] \
    || { echo "browser test: no ${CHROMIUM:-/usr/bin/chromium}; run deploy/browser-deps.sh first" >&2; exit 1; }

# A Node.js deploy/browser-deps.sh installed because the system's is too old.
for bin in "$PWD"/target/node-runtime/node_modules/node-linux-*/bin; do
    [ -x "$bin/node" ] && export PATH="$bin:$PATH"
done
export SCRAMJET_SCREENSHOT="${SCRAMJET_SCREENSHOT:-$PWD/target/browser/console.png}"
exec tests/support/with-daemon.sh node tests/browser/console.mjs
