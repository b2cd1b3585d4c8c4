#!/usr/bin/env bash
# The test command: set up .venv, then run the whole suite. Skipped tests fail the run, since
# every test (PostgreSQL, Redis, browser) is meant to run on a machine set up like CI.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q -rs "$@" | tee .pytest-output.txt
status=${PIPESTATUS[0]}
if grep -qE '^SKIPPED' .pytest-output.txt; then
  echo "test.sh: skipped tests count as failures here (see SKIPPED lines above)" >&2
  exit 1
fi
exit "$status"
