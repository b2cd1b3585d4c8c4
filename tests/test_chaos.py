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


def test_the_harness_counts_a_run_that_ended_before_its_kill_landed_as_ended():
    """Seed 171, round 71: SIGKILL to a run's group just after its last trial, and the run's
    exit 0 (it had ended, not yet reaped) was counted a violation. A kill never exits 0, and a
    signal other runs recover from still never ends a run with a traceback's exit 1."""
    sys.path.insert(0, str(SCRIPT.parent))
    import chaos

    def sent(what: str):
        return chaos._expected_exit(chaos.Run(args=[], n_trials=1, sent=what))

    assert sent("SIGKILL group 12") == sent("SIGKILL parent 12") == {-9, 0}
    assert sent("SIGINT group 12") == {130, 0} and sent("SIGTERM parent 12") == {143, 0}
    assert 1 not in sent("SIGKILL worker 12") and sent("SIGKILL writer 12") == {0, 1}
    assert chaos._expected_exit(chaos.Run(args=[], n_trials=1)) == {0}
