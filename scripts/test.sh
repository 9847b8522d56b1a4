#!/usr/bin/env bash
# Set up and run the whole test suite: the README's test command and what .ci/run calls.
# Installs the pinned CPU torch first so that pip never resolves torch to a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q -r requirements/torch-cpu.txt
$PY -m pip install -q -c requirements/constraints.txt -e ".[test]"
$PY -m ruff check src tests benchmarks examples
$PY -m ruff format --check src tests benchmarks examples
status=0
$PY -m pytest -n 2 --dist loadfile "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: treating that as a failure" >&2
fi
exit "$status"
