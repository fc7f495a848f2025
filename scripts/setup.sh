#!/usr/bin/env bash
# Install what mqtt-starter needs on a Debian machine: mosquitto (when missing), for the tests
# Chromium and its driver (the status page is tested in a real headless browser) and podman
# (the container image is built and run), and a
# virtual environment in .venv with the package and the given extras. Used by test.sh,
# demo.sh and bench.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

extras="${1:-}"
packages=()
if ! command -v mosquitto >/dev/null || ! command -v mosquitto_rr >/dev/null; then
    packages+=(mosquitto mosquitto-clients)
fi
if [[ ",$extras," == *",test,"* ]]; then
    if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
        packages+=(chromium chromium-driver)
    fi
    # The container image is built and run in the suite: podman with runc, and mmdebstrap
    # for a base image made from Debian's packages (no image registry is needed).
    for tool in podman runc mmdebstrap; do
        command -v "$tool" >/dev/null || packages+=("$tool")
    done
fi
if [ "${#packages[@]}" -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "== installing ${packages[*]} (apt-get)"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" \
        </dev/null >/dev/null
fi
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    "$python" -m venv .venv
fi
echo "== installing mqtt-starter${extras:+[$extras]} into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
