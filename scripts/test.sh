#!/usr/bin/env bash
# The whole check: install, then format, lint, types, import layers and the test suite, then the
# benchmark smoke runs. Extra arguments go to pytest (e.g. `scripts/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh test,dev,bench
installed=$SECONDS

# The static checks run beside the test suite, which leaves much of the machine idle while it
# waits on brokers, daemons and simulators; their output follows the suite's.
checks_log="$(mktemp)"
checks=""
# However this command ends (a failed step, Ctrl-C), the checks end with it.
trap '[ -z "$checks" ] || kill "$checks" 2>/dev/null || true; rm -f "$checks_log"' EXIT
(
    set -e
    echo "== ruff format --check"
    .venv/bin/ruff format --check mqtt_starter tests benchmarks
    echo "== ruff check"
    .venv/bin/ruff check mqtt_starter tests benchmarks
    echo "== mypy --strict"
    .venv/bin/mypy mqtt_starter tests
    echo "== import-linter (the layers, .importlinter)"
    .venv/bin/lint-imports
) >"$checks_log" 2>&1 &
checks=$!

echo "== pytest"
status=0
# Three workers (pytest-xdist) on two cores, as most tests wait on brokers, daemons and
# simulators more than they compute; each has its own brokers. The slow tests first, and a
# worker that runs out takes queued tests from the others (worksteal). Coverage includes the
# daemon, command and simulator subprocesses (pyproject.toml); a run below the floor fails.
# The delivery and reliability tests run twice: the daemon on uvloop and on asyncio's loop.
.venv/bin/python -m pytest -p no:cacheprovider -n 3 --dist worksteal --cov --cov-report=term \
    --cov-fail-under=90 "$@" || status=$?
checks_status=0
wait "$checks" || checks_status=$?
checks=""
cat "$checks_log"
if [ "$checks_status" -ne 0 ]; then
    echo "a static check failed (above)" >&2
    exit "$checks_status"
fi
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure" >&2
    exit 1
fi
[ "$status" -eq 0 ] || exit "$status"
echo "== benchmark smoke runs (benchmarks/test_smoke.py: the harness still runs end to end)"
.venv/bin/python -m pytest -p no:cacheprovider -q -n 4 benchmarks/test_smoke.py
echo "== everything passed in $((SECONDS - installed)) s after the install"
