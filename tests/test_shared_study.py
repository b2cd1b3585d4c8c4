"""The batched engine as a citizen of a shared study: trials live in storage while they train,
Optuna's queue is honoured, several engines share one study, crashes are recovered."""

from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter

import optuna
import pytest
from conftest import TINY_TOML, run_cli, spawned_children, start_cli
from optuna.trial import TrialState

from study import store
from study.store.recovery import fail_and_retry
from study.views import results

TINY = ["--config", "tiny.toml", "--max-epochs", "6", "--no-progress"]
FAST_HB = '\n[study]\nheartbeat_interval = 1\ngrace_period = 3\npruner = "none"\n'


def _study(url: str) -> optuna.Study:
    return optuna.load_study(study_name="sinstudy", storage=url)


def _param_sets(study: optuna.Study) -> list[tuple]:
    return [tuple(sorted(t.params.items())) for t in study.trials if t.state != TrialState.FAIL]


def test_trials_are_numbered_and_seeded_in_start_order_and_say_their_engine(workdir):
    r = run_cli("run", *TINY, "--n-trials", "12", "--slots", "4", cwd=workdir)
    assert r.returncode == 0, r.stderr
    trials = _study("sqlite:///storage/sinstudy.db").trials
    assert [t.number for t in trials] == list(range(12))
    starts = [t.datetime_start for t in trials]
    assert starts == sorted(starts)  # numbered in the order they started, not the order they ended
    for t in trials:  # pruned ones too
        assert (
            t.user_attrs["seed"] == t.number
            and t.user_attrs["engine"] == "batched"
            and "worker" in t.user_attrs
        )
    r = run_cli("run", *TINY, "--n-trials", "2", "--engine", "standard", cwd=workdir)
    assert r.returncode == 0, r.stderr
    new = _study("sqlite:///storage/sinstudy.db").trials[12:]
    assert [(t.user_attrs["engine"], t.user_attrs["seed"]) for t in new] == [
        ("standard", 12),
        ("standard", 13),
    ]


def test_a_trial_enqueued_with_plain_optuna_is_trained_first(workdir):
    url = "sqlite:///storage/sinstudy.db"
    assert run_cli("run", *TINY, "--n-trials", "2", "--slots", "2", cwd=workdir).returncode == 0
    study = _study(url)
    study.enqueue_trial(
        {"depth": 2, "width": 9, "lr": 0.0123, "activation": "tanh"}, user_attrs={"by": "hand"}
    )
    r = run_cli("run", *TINY, "--n-trials", "3", "--slots", "2", cwd=workdir)
    assert r.returncode == 0, r.stderr
    trials = _study(url).trials
    assert len(trials) == 5 and not [t for t in trials if t.state == TrialState.WAITING]
    queued = trials[2]
    assert queued.params == {"depth": 2, "width": 9, "lr": 0.0123, "activation": "tanh"}
    assert queued.state in (TrialState.COMPLETE, TrialState.PRUNED) and queued.intermediate_values
    assert queued.user_attrs["by"] == "hand" and queued.user_attrs["engine"] == "batched"


def test_grid_run_twice_never_repeats_a_point(workdir):
    # 2 x 3 = 6 points
    (workdir / "g.toml").write_text(
        TINY_TOML.replace("depth = [1, 2]", "depth = [1]")
        .replace("width = [4, 16]", "width = [4]")
        .replace("lr = [1e-3, 3e-2]", "lr = [1e-3, 1e-2]")
    )
    args = (
        "run",
        "--config",
        "g.toml",
        "--max-epochs",
        "3",
        "--no-progress",
        "--sampler",
        "grid",
        "--pruner",
        "none",
    )
    for n in ("4", "4"):
        r = run_cli(*args, "--n-trials", n, "--slots", "2", cwd=workdir)
        assert r.returncode == 0, r.stderr
    study = _study("sqlite:///storage/sinstudy.db")
    points = _param_sets(study)
    assert len(study.trials) == len(points) == len(set(points)) == 6
    assert len({t.system_attrs["grid_id"] for t in study.trials}) == 6


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_runs_at_once_share_one_study_without_repeating_a_parameter_set(
    workdir, backend, request
):
    """The same command started twice at the same time (as on two machines): every trial of
    both budgets, unique numbers, no parameter set trained twice, each run its own trials."""
    url = f"sqlite:///{workdir}/s.db" if backend == "sqlite" else request.getfixturevalue("pg_url")
    # the study exists
    assert run_cli("run", *TINY, "--n-trials", "1", "--storage", url, cwd=workdir).returncode == 0
    procs = [
        start_cli("run", *TINY, "--n-trials", "10", "--slots", "3", "--storage", url, cwd=workdir)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    study = _study(url)
    states = Counter(t.state for t in study.trials)
    assert (
        states[TrialState.COMPLETE] + states[TrialState.PRUNED] == 21 and len(study.trials) == 21
    ), states
    assert sorted(t.number for t in study.trials) == list(range(21))
    points = _param_sets(study)
    assert len(points) == len(set(points))
    assert len({t.user_attrs["worker"] for t in study.trials[1:]}) == 2


def test_workers_run_one_batched_engine_each_and_meet_the_budget(workdir):
    url = f"journal:///{workdir}/s.log"
    r = run_cli(
        "run",
        *TINY,
        "--n-trials",
        "16",
        "--workers",
        "2",
        "--slots",
        "3",
        "--storage",
        url,
        cwd=workdir,
    )
    assert r.returncode == 0, r.stderr
    study = _study(
        optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(f"{workdir}/s.log")
        )
    )
    assert len(study.trials) == 16 and all(
        t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials
    )
    assert {t.user_attrs["engine"] for t in study.trials} == {"batched"}
    # both workers' processes, never the parent (which worker gets how many trials is timing)
    assert 1 <= len({t.user_attrs["worker"] for t in study.trials}) <= 2
    complete, pruned = map(
        int, re.search(r"this run +(\d+) complete, (\d+) pruned", r.stdout).groups()
    )
    # counted by the pool's worker processes
    assert "2 workers" in r.stdout and complete + pruned == 16
    points = _param_sets(study)
    assert len(points) == len(set(points))


def _wait(predicate, proc, timeout: float = 60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            got = predicate()
        except Exception:  # the study (or its schema) is being created
            got = None
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError("timed out")


def _slow(workdir, *, epochs: int = 20000, slots: int = 3, n_trials: int = 20) -> list[str]:
    (workdir / "slow.toml").write_text(TINY_TOML + FAST_HB)
    return [
        "--config",
        "slow.toml",
        "--max-epochs",
        str(epochs),
        "--no-progress",
        "--slots",
        str(slots),
        "--n-trials",
        str(n_trials),
    ]


def test_plain_optuna_sees_running_trials_with_live_curves(workdir):
    url = "sqlite:///storage/sinstudy.db"
    proc = start_cli("run", *_slow(workdir), cwd=workdir)
    try:

        def live():
            running = _study(url).get_trials(states=(TrialState.RUNNING,))
            return (
                running
                if len(running) == 3 and all(len(t.intermediate_values) > 5 for t in running)
                else None
            )

        first = _wait(live, proc)
        time.sleep(2.5)  # the curves keep growing while the trials train
        later = {t.number: t for t in _study(url).get_trials(states=(TrialState.RUNNING,))}
        for t in first:
            assert len(later[t.number].intermediate_values) > len(t.intermediate_values)
            assert (
                set(t.params) == {"depth", "width", "lr", "activation"}
                and t.user_attrs["engine"] == "batched"
            )
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert not _study(url).get_trials(states=(TrialState.RUNNING,))


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_killed_run_leaves_running_trials_that_the_next_run_fails_and_retries(workdir, kind):
    url = {"sqlite": "sqlite:///storage/s.db", "journal": "journal:///storage/s.log"}[kind]
    proc = start_cli("run", *_slow(workdir), "--storage", url, cwd=workdir)

    def storage():
        if kind == "sqlite":  # read-only: a plain open of a file the run is creating would
            return results.open_for_reading(url)  # create Optuna's schema beside it
        assert (workdir / "storage/s.log").exists()
        return optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(workdir / "storage/s.log"))
        )

    running = _wait(
        lambda: [
            t
            for t in _study(storage()).get_trials(states=(TrialState.RUNNING,))
            if t.intermediate_values
        ],
        proc,
    )
    os.killpg(proc.pid, signal.SIGKILL)  # trainer and writer: nobody is left to tell storage
    proc.wait()
    assert {t.number for t in running} <= {
        t.number for t in _study(storage()).get_trials(states=(TrialState.RUNNING,))
    }
    time.sleep(4)  # past the 3 s grace period
    r = run_cli(
        "run",
        "--config",
        "slow.toml",
        "--max-epochs",
        "3",
        "--no-progress",
        "--n-trials",
        "8",
        "--storage",
        url,
        cwd=workdir,
    )
    assert r.returncode == 0, r.stderr
    assert "marked FAIL and queued for retry" in r.stderr
    study = _study(storage())
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    failed = {t.number: t for t in study.trials if t.state == TrialState.FAIL}
    assert {t.number for t in running} <= set(failed)
    retried = {
        t.system_attrs["failed_trial"]: t for t in study.trials if "failed_trial" in t.system_attrs
    }
    assert set(retried) == set(failed)
    for number, t in retried.items():
        assert t.params == failed[number].params and t.state in (
            TrialState.COMPLETE,
            TrialState.PRUNED,
        )


def test_killed_writer_ends_the_run_with_one_line(workdir):
    url = "sqlite:///storage/sinstudy.db"
    proc = start_cli("run", *_slow(workdir), cwd=workdir)
    _wait(lambda: _study(url).get_trials(states=(TrialState.RUNNING,)), proc)
    (writer,) = spawned_children(proc.pid)
    os.kill(writer, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("sinstudy:")]
    assert len(lines) == 1 and "writer process died" in lines[0], err
    assert not spawned_children(proc.pid)


def test_a_live_trial_failed_by_another_engine_is_not_stored_and_its_claim_returns(workdir):
    """A sibling's sweep can fail a live trial (its machine stalled past grace_period): the
    engine that trains it must not crash when it ends, store nothing of it, and give its budget
    claim back, so the run still ends with exactly --n-trials trials."""
    url = "sqlite:///storage/sinstudy.db"
    proc = start_cli("run", *_slow(workdir, epochs=4000, slots=1, n_trials=2), cwd=workdir)
    try:
        (victim,) = _wait(
            lambda: [
                t
                for t in _study(url).get_trials(states=(TrialState.RUNNING,))
                if len(t.intermediate_values) > 5
            ],
            proc,
        )
        # What another engine's sweep does. The first trial is a new best: its weights are
        # uploaded when it ends, to a trial that is no longer running.
        assert victim.number == 0
        swept = _study(url)
        assert fail_and_retry(store.of(swept._storage), swept, victim.number, max_retries=1)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err, err
    # Two ways, by which comes first: the trial ends before the writer's next sync sees it
    # failed (then its result is dropped), or the sync sees it first (then training stops).
    assert f"trial #{victim.number} was marked FAIL by another process while it trained" in err, (
        err
    )
    study = _study(url)
    states = Counter(t.state for t in study.trials)
    assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == 2, states
    failed = study.trials[victim.number]
    assert failed.state == TrialState.FAIL and "test_mse" not in failed.user_attrs
    assert "model_artifact" not in failed.user_attrs
    best = study.best_trial  # the next best stored its weights instead
    assert best.number != victim.number and "model_artifact" in best.user_attrs
