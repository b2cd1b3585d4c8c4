"""The chaos harness (scripts/chaos.py) on a small fixed schedule: one round on each storage,
with faults, a restart and the recovery run, then every invariant. A long run is recorded in
docs/results.md; a violation it finds gets its own test in tests/test_shared_trust.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "chaos.py"


def test_a_small_chaos_schedule_on_every_storage_breaks_no_invariant(tmp_path, pg_url):
    # pg_url: the harness needs the server the tests use (and skips nothing by itself)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--seed", "3", "--rounds", "3"],
        cwd=tmp_path,  # from any folder
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = proc.stdout.strip().splitlines()
    assert lines and lines[-1] == "0 violations", proc.stdout + proc.stderr
    assert proc.returncode == 0
    assert "3 rounds" in proc.stdout and "faults sent: {" in proc.stdout, proc.stdout
