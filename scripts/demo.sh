#!/usr/bin/env bash
# Install what is needed, then run the end-to-end demo on local defaults.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/mqtt-starter demo "$@"
