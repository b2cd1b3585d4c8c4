#!/usr/bin/env bash
# The test command: set up .venv, then run the whole suite. Skipped tests fail the run, since
# every test (PostgreSQL, worker processes, the browser) is meant to run on a machine set up like CI.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The dashboard test drives Debian's Chromium (Playwright with executable_path); PNG export uses
# it too. Install it where we can (root with apt), else the tests say what is missing.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian's chromium for the browser tests..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
fi
. .venv/bin/activate
python -m pytest -q -rs "$@" | tee .pytest-output.txt
status=${PIPESTATUS[0]}
if grep -qE '^SKIPPED' .pytest-output.txt; then
  echo "test.sh: skipped tests count as failures here (see SKIPPED lines above)" >&2
  exit 1
fi
exit "$status"
