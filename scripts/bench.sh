#!/usr/bin/env bash
# Install what is needed, then run the benchmarks (arguments go to benchmarks/run.py,
# e.g. --quick for a short smoke run). Results land in benchmarks/results/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh bench
exec .venv/bin/python -m benchmarks.run "$@"
