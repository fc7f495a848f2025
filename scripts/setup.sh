#!/usr/bin/env bash
# Install what mqtt-starter needs on a Debian machine: mosquitto (when missing) and a virtual
# environment in .venv with the package and the given extras. Sourced by test.sh and demo.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

extras="${1:-}"
if ! command -v mosquitto >/dev/null || ! command -v mosquitto_rr >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "== installing mosquitto (apt-get)"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients \
        </dev/null >/dev/null
fi
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    "$python" -m venv .venv
fi
echo "== installing mqtt-starter${extras:+[$extras]} into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
