#!/usr/bin/env bash
# Makes sure this machine can run the browser test of the console
# (tests/browser/run.sh):
#
#   Chromium   /usr/bin/chromium, Debian's package "chromium" (Playwright's own
#              browser downloads are not used: the test drives this one)
#   Node.js    node and npm (Debian's packages "nodejs" and "npm" if missing;
#              20 or later from the npm registry where that node is older)
#   npm deps   tests/browser/node_modules from package-lock.json (npm ci)
#
# Installs what is missing with apt-get (as root or through sudo). Idempotent;
# prints nothing when all is well. Meant for development machines and CI.
set -euo pipefail

say() { echo "browser-deps: $*" >&2; }
die() { say "$*"; exit 1; }

cd "$(dirname "$0")/.."
browser_dir=tests/browser

# shellcheck source=deploy/apt.sh
. deploy/apt.sh

ensure_chromium() {
    if [ ! -x /usr/bin/chromium ]; then
        # Without recommends, but with a font: text in screenshots must render.
        apt_install --no-install-recommends chromium fonts-dejavu-core
        [ -x /usr/bin/chromium ] || die "chromium installed, but /usr/bin/chromium is missing"
    fi
}

# Debian 12's own Node.js is 18, and playwright-core needs 20 or later: where
# the node found is older, a Node.js of the npm registry (the package
# node-linux-<arch>, the official binary) is installed with the old npm into
# target/node-runtime, which tests/browser/run.sh then puts first in PATH.
node_runtime=target/node-runtime
node_pinned=20.20.2

ensure_node() {
    local missing=()
    command -v node >/dev/null || missing+=(nodejs)
    command -v npm >/dev/null || missing+=(npm)
    if [ "${#missing[@]}" -gt 0 ]; then
        apt_install "${missing[@]}"
    fi
    command -v node >/dev/null || die "node is still missing"
    command -v npm >/dev/null || die "npm is still missing"
    local major
    major=$(node -p 'process.versions.node.split(".")[0]')
    if [ "$major" -lt 20 ]; then
        local arch bin
        arch=$(node -p 'process.arch')
        bin="$node_runtime/node_modules/node-linux-$arch/bin"
        if [ ! -x "$bin/node" ] || [ "$("$bin/node" --version)" != "v$node_pinned" ]; then
            say "Node.js $(node --version) is too old for playwright-core; installing Node.js $node_pinned from the npm registry into $node_runtime"
            mkdir -p "$node_runtime"
            npm install --prefix "$node_runtime" --no-audit --no-fund --loglevel=error \
                "node-linux-$arch@$node_pinned" >/dev/null || die "cannot install node-linux-$arch@$node_pinned"
        fi
        export PATH="$PWD/$bin:$PATH"
        major=$(node -p 'process.versions.node.split(".")[0]')
        [ "$major" -ge 20 ] || die "Node.js $(node --version) is still too old"
    fi
}

# npm ci wipes and reinstalls node_modules; skip it while node_modules was
# installed from this very package-lock.json (a stamp of its checksum).
ensure_node_modules() {
    local stamp="$browser_dir/node_modules/.scramjet-lock.sha256"
    local want
    want=$(sha256sum "$browser_dir/package-lock.json" | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
        && [ -f "$browser_dir/node_modules/playwright-core/package.json" ]; then
        return 0
    fi
    say "npm ci in $browser_dir"
    (cd "$browser_dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null) \
        || die "npm ci failed in $browser_dir"
    echo "$want" >"$stamp"
}

ensure_chromium
ensure_node
ensure_node_modules
