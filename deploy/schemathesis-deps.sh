#!/usr/bin/env bash
# Makes sure schemathesis (from PyPI, the version tests/openapi/requirements.txt
# pins) is installed in a virtual environment of the repository's own,
# target/schemathesis-venv (ignored by git, removed by `cargo clean`).
# Idempotent: nothing is fetched when the environment already has it.
# Needs python3 with its venv module (Debian: apt-get install python3-venv).
set -euo pipefail

say() { echo "schemathesis-deps: $*" >&2; }
die() { say "$*"; exit 1; }

cd "$(dirname "$0")/.."
venv=target/schemathesis-venv
requirements=tests/openapi/requirements.txt
stamp=$venv/.requirements

command -v python3 >/dev/null || die "python3 is needed (apt-get install python3 python3-venv)"
if [ -x "$venv/bin/schemathesis" ] && cmp -s "$requirements" "$stamp"; then
    exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
    say "creating $venv"
    python3 -m venv "$venv" || die "cannot create a virtual environment (apt-get install python3-venv)"
fi
say "installing $(grep -v '^#' "$requirements" | tr '\n' ' ')"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
cp "$requirements" "$stamp"
