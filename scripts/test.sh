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
echo "== the delivery and reliability tests again, with the daemon on asyncio's own event loop"
# The daemon runs on uvloop where it exists (ops/platform.py); these promises must hold on the
# standard loop too, which Windows and MQTT_STARTER_LOOP=asyncio use.
MQTT_STARTER_LOOP=asyncio .venv/bin/python -m pytest -p no:cacheprovider -q -n 2 \
    tests/integration/test_delivery.py tests/integration/test_reliability.py
echo "== benchmark smoke runs (benchmarks/test_smoke.py: the harness still runs end to end)"
.venv/bin/python -m pytest -p no:cacheprovider -q -n 3 benchmarks/test_smoke.py
