"""Real worker processes on real storages: exact budgets, crashes, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from conftest import TINY_TOML, run_cli, spawned_children, start_cli
from optuna.trial import TrialState

from study import store

# Slow trials (no pruning, many epochs) so a signal lands mid-trial; fast heartbeat for tests.
SLOW_TOML = TINY_TOML + '\n[study]\nheartbeat_interval = 1\ngrace_period = 3\npruner = "none"\n'


def _load(url: str) -> optuna.Study:
    return optuna.load_study(study_name="sinstudy", storage=store.load(url))


def _check_exact(study: optuna.Study, n: int) -> Counter:
    states = Counter(t.state for t in study.trials)
    numbers = [t.number for t in study.trials]
    assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == n
    assert len(numbers) == len(set(numbers)) == len(study.trials)
    assert states[TrialState.RUNNING] == 0 and states[TrialState.WAITING] == 0
    return states


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_four_local_workers_meet_the_budget_exactly(workdir, kind):
    url = {"sqlite": f"sqlite:///{workdir}/s.db", "journal": f"journal:///{workdir}/s.log"}[kind]
    # the standard engine's pool; batched workers: test_shared_study.py
    r = run_cli(
        "run",
        "--config",
        "tiny.toml",
        "--max-epochs",
        "5",
        "--no-progress",
        "--storage",
        url,
        "--n-trials",
        "40",
        "--workers",
        "4",
        "--engine",
        "standard",
        cwd=workdir,
    )
    assert r.returncode == 0, r.stderr
    states = _check_exact(_load(url), 40)
    assert states[TrialState.FAIL] == 0
    assert "4 workers" in r.stdout


def test_eight_workers_on_postgresql(workdir, pg_url):
    r = run_cli(
        "run",
        "--config",
        "tiny.toml",
        "--max-epochs",
        "5",
        "--no-progress",
        "--storage",
        pg_url,
        "--n-trials",
        "40",
        "--workers",
        "8",
        "--engine",
        "standard",
        cwd=workdir,
    )
    assert r.returncode == 0, r.stderr
    assert _check_exact(_load(pg_url), 40)[TrialState.FAIL] == 0


def _wait_running(url: str, n: int, proc, timeout: float = 60) -> list[optuna.trial.FrozenTrial]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if Path(url.split(":///", 1)[1]).exists():
            try:
                # with all its params: a trial killed mid-suggest has none to retry with
                running = [
                    t
                    for t in _load(url).get_trials(states=(TrialState.RUNNING,))
                    if len(t.params) >= 4
                ]
            except Exception:  # the study (or its schema) is still being created
                running = []
            if len(running) >= n:
                return running
        time.sleep(0.2)
    raise AssertionError("no trial started in time")


@pytest.mark.parametrize("engine", ["standard", "batched"])
def test_sigkilled_worker_costs_only_its_running_trials_which_are_retried(workdir, engine):
    """The parent replaces the worker; its running trials (one on the standard engine, its
    slots' on the batched engine) are failed at once and retried, and the budget still counts
    exactly."""
    (workdir / "slow.toml").write_text(SLOW_TOML)
    url = f"sqlite:///{workdir}/s.db"
    # 2,000 epochs: long enough that the killed worker is still training the trials seen running
    proc = start_cli(
        "run",
        "--config",
        "slow.toml",
        "--max-epochs",
        "2000",
        "--no-progress",
        "--storage",
        url,
        "--n-trials",
        "8",
        "--workers",
        "2",
        "--slots",
        "2",
        "--engine",
        engine,
        cwd=workdir,
    )
    running = _wait_running(url, 2, proc)
    pid = next(
        int(t.user_attrs["worker"].rsplit(":", 1)[1]) for t in running if "worker" in t.user_attrs
    )
    assert pid in spawned_children(proc.pid)
    os.kill(pid, signal.SIGKILL)  # a worker that is running trials
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert (
        "was killed (SIGKILL)" in err
        and ("queued for retry" in err or "requeues" in err)
        and "Traceback" not in err
    ), err
    study = _load(url)
    states = _check_exact(study, 8)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert 1 <= states[TrialState.FAIL] <= (1 if engine == "standard" else 2)
    # the killed worker's, no other
    assert all(t.user_attrs["worker"].endswith(f":{pid}") for t in failed)
    for f in failed:
        retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == f.number]
        assert len(retries) == 1 and retries[0].params == f.params
        assert retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_killed_standard_run_is_recovered_on_resume_by_heartbeat(workdir, kind):
    (workdir / "slow.toml").write_text(SLOW_TOML)
    url = {"sqlite": f"sqlite:///{workdir}/s.db", "journal": f"journal:///{workdir}/s.log"}[kind]
    # the standard engine writes RUNNING trials, which a dead run leaves behind for the heartbeat
    common = (
        "run",
        "--config",
        "slow.toml",
        "--max-epochs",
        "300",
        "--no-progress",
        "--storage",
        url,
        "--engine",
        "standard",
    )
    proc = start_cli(*common, "--n-trials", "5", cwd=workdir)
    victim = _wait_running(url, 1, proc)[0]
    os.killpg(proc.pid, signal.SIGKILL)  # the whole run: nobody is left to tell Optuna
    proc.wait()
    assert _load(url).trials[victim.number].state == TrialState.RUNNING
    time.sleep(4)  # past the 3 s grace period
    r = run_cli(*common, "--n-trials", "2", cwd=workdir)
    assert r.returncode == 0, r.stderr
    study = _load(url)
    killed = study.trials[victim.number]  # read now: when polled it may have been mid-suggest
    assert killed.state == TrialState.FAIL
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].params == killed.params
    assert retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    new = [t for t in study.trials if t.number > victim.number]
    # the budget of the resume
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in new) == 2


@pytest.mark.parametrize(
    "workers, signum, target, code",
    [
        (1, signal.SIGTERM, "process", 143),
        (2, signal.SIGINT, "group", 130),  # Ctrl-C in a terminal reaches the whole group
        (2, signal.SIGTERM, "process", 143),  # `kill PID` of the parent: it stops its workers
    ],
)
def test_interrupt_leaves_a_consistent_study_and_prints_the_summary(
    workdir, workers, signum, target, code
):
    (workdir / "slow.toml").write_text(SLOW_TOML)
    url = f"sqlite:///{workdir}/s.db"
    proc = start_cli(
        "run",
        "--config",
        "slow.toml",
        "--max-epochs",
        "300",
        "--no-progress",
        "--storage",
        url,
        "--n-trials",
        "20",
        "--workers",
        str(workers),
        "--engine",
        "standard",
        cwd=workdir,
    )
    running = _wait_running(url, workers, proc)
    kids = spawned_children(proc.pid)
    assert len(kids) == (workers if workers > 1 else 0)
    (os.killpg if target == "group" else os.kill)(proc.pid, signum)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        import shutil

        if shutil.which("py-spy"):
            for pid in [proc.pid, *kids]:
                print(
                    subprocess.run(
                        ["py-spy", "dump", "--pid", str(pid)], capture_output=True, text=True
                    ).stdout
                )
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == code, err
    assert f"interrupted by {signal.Signals(signum).name}" in out, err
    assert "Traceback" not in err, err
    study = _load(url)
    assert not study.get_trials(states=(TrialState.RUNNING,))
    for t in running:
        assert study.trials[t.number].state in (
            TrialState.FAIL,
            TrialState.COMPLETE,
            TrialState.PRUNED,
        )
    assert any(t.state == TrialState.FAIL for t in study.trials)
    assert not [k for k in kids if Path(f"/proc/{k}").exists()]  # the workers were stopped too


def test_workers_zero_and_missing_gpus_are_bad_input(workdir):
    for args, fragment in ((["--workers", "0"], "--workers"), (["--devices", "0,1"], "--devices")):
        r = run_cli("run", "--no-progress", *args, cwd=workdir)
        assert (
            r.returncode == 2 and fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1
        ), r.stderr
    assert not (workdir / "storage").exists()


def test_a_postgresql_host_that_does_not_resolve_fails_fast_with_one_line(workdir):
    """Not waited for as a server that is down (tests/test_hardening.py): a typo."""
    t0 = time.time()
    url = "postgresql://postgres@no-such-host.invalid:5432/test"
    r = run_cli("run", "--no-progress", "--storage", url, cwd=workdir)
    assert r.returncode == 1 and "cannot connect to PostgreSQL" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert time.time() - t0 < 30  # bounded by the connect timeout, not a hang
