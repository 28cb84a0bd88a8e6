#!/usr/bin/env bash
# Sets everything up (apt packages, .venv, the package with its test extras) and runs the
# whole suite: lint, format check, type check, tests. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test

# One command a line: under `set -e`, a failure inside an && list would not stop the script.
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
set +e
# Up to 4 processes (pytest-xdist; `-n 0` after it runs them in one): most tests wait on
# servers, mounts and daemons, so two processes on two cores halve the time (~12 -> ~6 min).
# worksteal: a process that runs out of tests takes some of the other's, rather than idling
# while the other ends a queue that holds a long test.
.venv/bin/python -m pytest -n auto --maxprocesses=4 --dist worksteal -ra --durations=20 "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "test.sh: pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$status"
