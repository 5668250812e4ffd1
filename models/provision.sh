#!/usr/bin/env bash
# Provisions Parley's models into the cache (idempotent: a complete cache is reused as it is).
#   models/provision.sh [--roles vad,tts] [--check] [--force] [--print-dir]
# Creates the pinned converter venv ~/.cache/parley/venv-<hash of requirements.txt> on first use,
# then runs provision.py with it. Needs CPython 3.11 (python3, or $PYTHON) with venv, espeak-ng,
# and Debian's pocketsphinx-testdata for the parity checks.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"

step() { printf '[provision.sh] %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

command -v "$python" >/dev/null || die "$python not found: install CPython 3.11 (Debian 12: apt-get install python3 python3-venv)"
version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[[ "$version" == "3.11" ]] || die "$python is Python $version; the pinned converter tools (models/requirements.txt) are for CPython 3.11: set PYTHON=/path/to/python3.11"

req="$here/requirements.txt"
req_hash="$(sha256sum "$req" | cut -c1-16)"
venv="${HOME}/.cache/parley/venv-${req_hash}"
if [[ ! -f "$venv/.complete" ]]; then
    step "creating the converter venv at $venv"
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv" || die "python3 -m venv failed: on Debian install python3-venv (apt-get install python3-venv)"
    step "installing the pinned, hash-checked converter tools (models/requirements.txt)"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps --only-binary :all: -r "$req" \
        || die "installing models/requirements.txt failed (see above); a hash mismatch means the registry served a different file"
    touch "$venv/.complete"
else
    step "using the converter venv at $venv"
fi

step "running provision.py"
exec "$venv/bin/python" "$here/provision.py" "$@"
