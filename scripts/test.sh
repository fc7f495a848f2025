#!/usr/bin/env bash
# The whole check: install, then format, lint, types, and the test suite.
# Extra arguments go to pytest (e.g. `scripts/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh test,dev,bench

echo "== ruff format --check"
.venv/bin/ruff format --check mqtt_starter tests benchmarks
echo "== ruff check"
.venv/bin/ruff check mqtt_starter tests benchmarks
echo "== mypy --strict"
.venv/bin/mypy mqtt_starter tests
echo "== import-linter (the layers, .importlinter)"
.venv/bin/lint-imports
echo "== pytest"
status=0
# Two workers (pytest-xdist), each with its own brokers. Coverage includes the daemon, command
# and simulator subprocesses (pyproject.toml); a run below the floor fails.
.venv/bin/python -m pytest -p no:cacheprovider -n 2 --cov --cov-report=term \
    --cov-fail-under=90 "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure" >&2
    exit 1
fi
[ "$status" -eq 0 ] || exit "$status"
echo "== benchmark smoke runs (benchmarks/test_smoke.py: the harness still runs end to end)"
.venv/bin/python -m pytest -p no:cacheprovider -q -n 3 benchmarks/test_smoke.py
