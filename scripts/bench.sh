#!/usr/bin/env bash
# Install what is needed, then run the benchmarks (arguments go to benchmarks/run.py,
# e.g. --quick for a short smoke run): the request path against the floor, then the
# monitor's cost per interval, with and without a slow webhook, then the status page's.
# Results land in benchmarks/results/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh bench
.venv/bin/python -m benchmarks.run "$@"
.venv/bin/python -m benchmarks.monitor "$@"
.venv/bin/python -m benchmarks.webhooks "$@"
exec .venv/bin/python -m benchmarks.status_page "$@"
