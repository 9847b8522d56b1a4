#!/usr/bin/env bash
# Set up and run the main job: `orthotorch compare` with its defaults (or the given arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q -r requirements/torch-cpu.txt
$PY -m pip install -q -c requirements/constraints.txt -e ".[bench]"
exec $PY -m orthotorch compare "$@"
