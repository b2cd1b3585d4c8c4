"""The chaos harness (scripts/chaos.py) on a small fixed schedule: one round on each storage,
with faults, a restart and the recovery run, then every invariant. A long run is recorded in
docs/results.md; a violation it finds gets its own test in tests/test_shared_trust.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_a_small_chaos_schedule_with_storage_faults_breaks_no_invariant(tmp_path):
    """Seed 2: a PostgreSQL round whose server the harness stops and starts again, and a SQLite
    round whose disk fills for a while; every run waits them out."""
    if os.geteuid() != 0:
        pytest.skip("the harness's storage faults mount a tmpfs and run a server: needs root")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--seed", "2", "--rounds", "2", "--storage-faults"]
        + ["--storages", "postgresql,sqlite"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = proc.stdout.strip().splitlines()
    assert lines and lines[-1] == "0 violations", proc.stdout + proc.stderr
    assert "'outage': 1" in proc.stdout and "'full': 1" in proc.stdout, proc.stdout
    assert "skipped" not in proc.stdout and proc.returncode == 0


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


def _trial(number: int, state, user=None, system=None):
    from optuna.trial import FrozenTrial

    return FrozenTrial(
        number=number, state=state, value=None, datetime_start=None, datetime_complete=None,
        params={}, distributions={}, user_attrs=user or {}, system_attrs=system or {},
        intermediate_values={}, trial_id=number,
    )  # fmt: skip


def test_the_retry_invariant_names_a_fail_without_its_retry_and_no_other():
    from optuna.trial import TrialState as S

    sys.path.insert(0, str(SCRIPT.parent))
    import chaos

    killed = chaos.Run(args=[], n_trials=1, sent="SIGKILL group", run_prefix="h:1:")
    stopped = chaos.Run(args=[], n_trials=1, sent="SIGINT parent", run_prefix="h:2:")
    killed.proc = stopped.proc = object()  # started this round
    trials = [
        _trial(0, S.FAIL, {"run": "h:1:a"}),  # swept, retried by #1
        _trial(1, S.COMPLETE, system={"failed_trial": 0, "retry_history": [0]}),
        _trial(2, S.FAIL, {"run": "h:1:a"}),  # swept, no retry: the violation
        _trial(3, S.FAIL, {"run": "h:2:a"}),  # its run was interrupted
        _trial(4, S.FAIL, {"failed_reason": "interrupted"}),
        _trial(
            5, S.FAIL, {"failed_reason": "trial #1 has the same parameter set (another engine)"}
        ),
        _trial(6, S.FAIL, {"run": "h:1:a"}, {"failed_trial": 9, "retry_history": [9]}),  # spent
        _trial(7, S.FAIL, {"run": "h:3:a"}),  # an earlier round's run: checked in its round
    ]
    found = []
    chaos._check_retries(trials, [killed, stopped], lambda kind, what: found.append(what))
    assert len(found) == 1 and found[0].startswith("trial #2 FAIL"), found
