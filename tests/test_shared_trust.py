"""The shared study as users first meet it: one command started twice at once, workers, a restart
on the same machine, a trial failed from outside, Ctrl-C with workers, a journal with a bad line.
Each case failed before the fix named in its test (real processes, real storages)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from conftest import TINY_TOML, run_cli, spawned_children, start_cli
from optuna.trial import TrialState

from study import store
from study.run.batched.sync import SYNC_S
from study.run.budget import Budget, Claims
from study.store import journal, recovery
from study.trial.attrs import SEED_STREAM
from study.trial.space import param_set
from study.views.summary import Leftovers

# Long trials (no pruning, many epochs) so a fault lands mid-trial; fast heartbeat for tests.
SLOW_TOML = TINY_TOML + '\n[study]\nheartbeat_interval = 1\ngrace_period = 3\npruner = "none"\n'


def _url(kind: str, workdir: Path, pg_url: str | None = None) -> str:
    return {
        "sqlite": f"sqlite:///{workdir}/s.db",
        "journal": f"journal:///{workdir}/s.log",
        "postgresql": pg_url,
    }[kind]


def _load(url: str) -> optuna.Study:
    return optuna.load_study(study_name="sinstudy", storage=store.load(url))


def _no_twins(study: optuna.Study) -> None:
    """No parameter set trained twice except by retries, no weight seed shared."""
    trials = [t for t in study.trials if t.state != TrialState.FAIL]
    sets = Counter(
        param_set(t.params, t.distributions)
        for t in trials
        if "failed_trial" not in t.system_attrs
    )
    assert max(sets.values()) == 1, [s for s, n in sets.items() if n > 1]
    seeds = Counter(
        t.user_attrs["seed"] for t in study.trials if "failed_trial" not in t.system_attrs
    )
    assert max(seeds.values()) == 1, [s for s, n in seeds.items() if n > 1]


def _wait_running(url: str, n: int, proc, timeout: float = 60) -> list:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            running = [
                t
                for t in _load(url).get_trials(states=(TrialState.RUNNING,))
                if len(t.intermediate_values) >= 1
            ]
        except Exception:  # the storage or the study is still being created
            running = []
        if len(running) >= n:
            return running
        time.sleep(0.2)
    raise AssertionError("no trial trained in time")


@pytest.mark.parametrize("kind", ["sqlite", "journal", "postgresql"])
def test_one_command_started_twice_at_once_on_a_fresh_study_trains_no_parameter_set_twice(
    workdir, kind, request
):
    """Before: the storage check was skipped while an engine had seen no trial (SQLite,
    PostgreSQL), and the journal compared only with its last sync: 12 of 12 trained twice."""
    url = _url(kind, workdir, request.getfixturevalue("pg_url") if kind == "postgresql" else None)
    args = ("run", "--config", "tiny.toml", "--max-epochs", "12", "--n-trials", "10")
    args += ("--no-progress", "--storage", url)
    procs = [start_cli(*args, cwd=workdir) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert "Traceback" not in err
    study = _load(url)
    states = Counter(t.state for t in study.trials)
    assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == 20
    assert states[TrialState.RUNNING] == states[TrialState.WAITING] == 0
    _no_twins(study)


def test_workers_split_a_small_budget_and_each_seeds_from_its_own_stream(workdir):
    """Before: with 32 slots each, the first worker up trained all 8 trials, and the second
    worker's trials trained with the first one's weight seeds."""
    url = f"sqlite:///{workdir}/s.db"
    r = run_cli(
        "run", "--config", "tiny.toml", "--max-epochs", "12", "--n-trials", "8",
        "--workers", "2", "--no-progress", "--storage", url, cwd=workdir,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    study = _load(url)
    assert sorted(Counter(t.user_attrs["worker"] for t in study.trials).values()) == [4, 4]
    _no_twins(study)
    streams = {t.user_attrs["seed"] // SEED_STREAM for t in study.trials}
    assert streams == {0, 1}  # worker i counts its trials' seeds from i * SEED_STREAM


def test_budget_shares_and_gives_back_by_worker():
    b = Budget(5, None, workers=2)
    assert [b.claim(worker=0) for _ in range(4)] == [True, True, True, False]  # share 3
    assert [b.claim(worker=1) for _ in range(3)] == [True, True, False]  # 5 in all
    b.release(worker=0)  # a trial worker 0 could not store: the claim goes back
    assert b.claim(worker=0) and not b.claim(worker=1)  # 5 in all again, worker 0 at its share
    b.release(worker=1, for_queued=True)  # a crashed trial whose retry is queued
    assert not b.claim(worker=1)  # the reserved claim waits for the retry
    assert b.claim(queued=True, worker=0)  # which may start anywhere, past the share


def test_a_claim_that_moved_between_workers_is_not_stranded_by_the_shares():
    """Chaos seed 221, round 2 (`--workers 2 --n-trials 2`, exit 0, one trial finished): worker
    1's trial failed from outside keeps its claim reserved for the retry; worker 0 takes the
    retry on that claim, worker 1 ends (the budget looks spent), another run takes the retry
    first and worker 0 gives the claim back: at its share, worker 0 could not use it."""
    b = Budget(2, None, workers=2)
    assert b.claim(worker=0) and b.claim(worker=1)
    b.release(worker=1, for_queued=True)  # its trial failed elsewhere, a retry queued
    assert b.claim(queued=True, worker=0)  # worker 0 takes the retry on the reserved claim
    b.ended()  # worker 1: nothing left to start, nothing reserved
    b.release(worker=0)  # the retry was another run's first
    assert b.claim(worker=0)  # past its share: the ended worker's is free
    assert not b.claim(worker=0)  # and the budget holds


def test_a_worker_held_by_its_share_waits_while_the_budget_has_trials_left():
    """Chaos seed 251, round 84 (`--workers 2 --n-trials 3`, exit 0, two trials finished): worker
    0's trial was failed from outside (a false stale under load), its claim reserved for the
    retry; another run took the retry. Worker 1, at its share, waited for the retry too, ended
    the wait (unreserving the claim) just after worker 0 had looked, so worker 0 saw nothing
    reserved and ended without claiming again, and worker 1, still held by its share (worker 0
    had not ended yet), ended too. An engine now ends only when the budget is spent."""
    b = Budget(3, None, workers=2)
    assert b.claim(worker=0) and b.claim(worker=1) and b.claim(worker=1)  # shares 2 and 2
    b.release(worker=0, for_queued=True)  # worker 0's trial failed elsewhere, retry queued
    assert b.spent()  # for new trials: the reserved claim waits for the retry (Ledger's wait)
    b.unreserve()  # worker 1's wait ran out: the retry was another run's
    assert not b.claim(worker=1)  # at its share while worker 0 lives
    assert not b.spent()  # so worker 1 must not end: one trial is left
    assert b.claim(worker=0) and b.spent()  # worker 0 takes it; now both may end


def test_an_owner_is_gone_only_when_its_process_on_this_machine_has_ended():
    alive = recovery.owner_attr()
    assert not recovery.owner_gone(alive)
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    dead = recovery.owner_attr(p.pid)
    p.wait()
    assert recovery.owner_gone(dead)
    host, boot, pid, ticks = alive.split(" ")
    assert recovery.owner_gone(f"{host} {boot} {pid} {int(ticks) + 1}")  # a reused pid
    assert not recovery.owner_gone(f"elsewhere {boot} {p.pid} {ticks}")  # the heartbeat decides
    assert not recovery.owner_gone(f"{host} other-boot {p.pid} {ticks}")
    assert not recovery.owner_gone(None) and not recovery.owner_gone("host:123")


@pytest.mark.parametrize("engine", ["batched", "standard"])
def test_a_restart_here_recovers_a_killed_runs_trials_at_once_and_says_so(workdir, engine):
    """Before: the same command right after `kill -9` finished and left its predecessor's trials
    RUNNING (the grace period had not passed), and its summary said "0 failed"."""
    (workdir / "slow.toml").write_text(SLOW_TOML.replace("grace_period = 3", "grace_period = 600"))
    url = f"sqlite:///{workdir}/s.db"
    common = ("run", "--config", "slow.toml", "--no-progress", "--storage", url)
    common += ("--engine", engine)
    proc = start_cli(*common, "--max-epochs", "3000", "--n-trials", "4", cwd=workdir)
    victims = _wait_running(url, 1, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # trainer and writer alike: nobody tells the storage
    proc.wait()
    stranded = {t.number for t in _load(url).get_trials(states=(TrialState.RUNNING,))}
    assert {t.number for t in victims} <= stranded
    r = run_cli(*common, "--max-epochs", "12", "--n-trials", str(len(stranded)), cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    for n in stranded:
        assert f"trial #{n} of an earlier run: its process on this machine is gone" in r.stderr
    study = _load(url)
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    for n in stranded:
        assert study.trials[n].state == TrialState.FAIL
        retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == n]
        assert len(retry) == 1 and retry[0].state.is_finished()
        assert retry[0].user_attrs["seed"] == study.trials[n].user_attrs["seed"]  # its seed
    line = next(x for x in r.stdout.splitlines() if x.startswith("recovered"))
    assert all(f"#{n}" in line for n in stranded) and "retried as" in line, r.stdout


@pytest.mark.parametrize("engine", ["batched", "standard"])
def test_a_retry_by_a_run_with_another_seed_trains_with_its_trials_seeds(workdir, engine):
    """Found by chaos.py (seed 12): runs of one study may differ in --seed, and a retry's seeds
    were recomputed from a count, (seed - --seed) // repeats, which loses the offset: trial #0
    of `--seed 1 --repeats 2` (seeds 1, 2) was retried by a `--seed 0` run with seeds 0, 1."""
    url = f"sqlite:///{workdir}/s.db"
    common = ("run", "--config", "tiny.toml", "--no-progress", "--storage", url, "--repeats", "2")
    r = run_cli(*common, "--seed", "1", "--n-trials", "1", "--engine", engine, cwd=workdir)
    assert r.returncode == 0, r.stderr
    study = _load(url)
    first = study.trials[0]
    assert first.user_attrs["seeds"] == [1, 2]
    # a retry of #0, queued as Optuna's stale-trial callback queues it
    study.enqueue_trial(first.params)
    waiting = study.get_trials(states=(TrialState.WAITING,))[0]
    study._storage.set_trial_system_attr(waiting._trial_id, "failed_trial", 0)
    r = run_cli(*common, "--seed", "0", "--n-trials", "1", "--engine", engine, cwd=workdir)
    assert r.returncode == 0, r.stderr
    retry = _load(url).trials[1]
    assert retry.state.is_finished() and retry.system_attrs["failed_trial"] == 0
    assert retry.user_attrs["seed"] == 1 and retry.user_attrs["seeds"] == [1, 2]


@pytest.mark.parametrize("engine", ["batched", "standard"])
def test_a_trial_failed_from_outside_stops_within_seconds_and_its_slot_is_refilled(
    workdir, engine
):
    """optuna-dashboard's "Fail trial" (or a sibling's sweep): before, a batched trial trained
    on to its end and was dropped then, and the standard engine crashed on Optuna's tell of a
    finished trial; now it stops, and the next trial takes its place."""
    (workdir / "slow.toml").write_text(SLOW_TOML)
    url = f"sqlite:///{workdir}/s.db"
    proc = start_cli(
        "run", "--config", "slow.toml", "--no-progress", "--storage", url, "--engine", engine,
        "--max-epochs", "4000", "--n-trials", "3", "--slots", "2", cwd=workdir,
    )  # fmt: skip
    victim = _wait_running(url, 1, proc)[0]
    storage = store.load(url)
    storage.set_trial_state_values(victim._trial_id, TrialState.FAIL)  # the dashboard's button
    time.sleep(6)  # the writer's sync (2 s) and the trainer's next epoch
    seen = len(storage.get_trial(victim._trial_id).intermediate_values)
    time.sleep(3)
    assert len(storage.get_trial(victim._trial_id).intermediate_values) == seen
    study = _load(url)  # the slot holds another trial now
    assert [t.number for t in study.get_trials(states=(TrialState.RUNNING,))] != [victim.number]
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert f"trial #{victim.number} was marked FAIL by another process" in err
    assert "Traceback" not in err
    assert not _load(url).get_trials(states=(TrialState.RUNNING,))


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_ctrl_c_with_batched_workers_leaves_nothing_running(workdir, kind):
    """Before: SIGINT to the group of `--workers 2` left 2-4 trials RUNNING for good."""
    (workdir / "slow.toml").write_text(SLOW_TOML)
    url = _url(kind, workdir)
    proc = start_cli(
        "run", "--config", "slow.toml", "--no-progress", "--storage", url,
        "--max-epochs", "3000", "--n-trials", "8", "--workers", "2", cwd=workdir,
    )  # fmt: skip
    _wait_running(url, 4, proc)
    kids = spawned_children(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    study = _load(url)
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert "interrupted by SIGINT" in out
    assert not [k for k in kids if Path(f"/proc/{k}").exists()]


def test_a_journal_line_of_garbage_is_skipped_with_one_line_naming_it(workdir):
    """Before: every command ended with JSONDecodeError, naming no file, line or fix."""
    url = f"journal:///{workdir}/s.log"
    args = ("--config", "tiny.toml", "--max-epochs", "6", "--no-progress", "--storage", url)
    assert run_cli("run", *args, "--n-trials", "3", cwd=workdir).returncode == 0
    path = workdir / "s.log"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:5] + [b"{not json\n"] + lines[5:] + [b"garbage\n"]))
    before = path.read_bytes()
    best = run_cli("best", "--storage", url, cwd=workdir)
    assert best.returncode == 0, best.stderr
    assert path.read_bytes() == before  # a reader changes nothing
    for n in (6, len(lines) + 2):
        assert f"note: line {n} of {str(path)!r} is not an Optuna journal record" in best.stderr
        assert f"sed -i '{n}d'" in best.stderr
    r = run_cli("run", *args, "--n-trials", "3", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "note: line 6 of" in r.stderr
    study = _load(url)
    assert len(study.trials) == 6 and not study.get_trials(states=(TrialState.RUNNING,))


def test_the_summary_names_what_a_run_leaves_behind(tmp_path):
    """Others' RUNNING trials with their heartbeat's age, queued retries, recovered trials."""
    url = f"sqlite:///{tmp_path}/s.db"
    storage = store.open_store(store.parse(url), store.Heartbeat(5, 20, max_retries=1)).optuna
    study = optuna.create_study(study_name="s", storage=storage)
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    study.add_trial(optuna.trial.create_trial(params={"x": 0.1}, distributions=dist, value=1.0))
    gone = study.ask(dist)  # a trial whose run died: failed and retried
    other = study.ask(dist)  # another run's, beating
    later = study.ask(dist)  # another run's, started after this one, swept: failed and retried
    stopped = study.ask(dist)  # another run's, interrupted (FAIL, no retry): not recovered
    storage.record_heartbeat(other._trial_id)
    for t in (gone, later):
        recovery.fail_and_retry(store.of(study._storage), study, t.number, max_retries=1)
    study.tell(stopped, state=TrialState.FAIL)
    left = Leftovers.of(
        study,
        study.get_trials(),
        recovered={gone.number: "its process on this machine is gone"},
        running_before={gone.number, other.number},
        mine=lambda t: False,
        since={0, gone.number, other.number},
    )
    text = "\n".join(left.lines())
    assert f"recovered      #{gone.number}, #{later.number} of other runs marked FAIL" in text
    assert "retried as #5, #6" in text
    assert f"running        #{other.number} of other runs, last heartbeat" in text
    assert "queued         #5, #6 (retries of #1, #3): the next run takes them" in text, text
    age = left.running[other.number]
    assert age is not None and 0 <= age < 60


def test_workers_that_cannot_fit_in_memory_are_refused_before_anything_is_written(workdir):
    """Before: --workers 256 passed, the memory check counting models, not processes."""
    from study.run.opening import PROCESS_BYTES, _available_ram

    workers = _available_ram() // PROCESS_BYTES  # twice that many processes with their writers
    r = run_cli("run", "--workers", str(workers), "--slots", "1", "--n-trials", "1", cwd=workdir)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert f"{2 * workers} processes (workers and their storage writers" in lines[0]
    assert lines[0].endswith("use fewer --workers")
    assert not (workdir / "storage").exists()


def test_standard_engines_started_together_never_train_one_parameter_set_twice(workdir):
    """Before: the standard engine (Optuna's own ask) had no check at all. On a one-point space
    every proposal is the same: only one run may train it, and the other stops asking."""
    (workdir / "point.toml").write_text(
        TINY_TOML.split("[search_space]")[0]
        + '[search_space]\ndepth = [1]\nwidth = [4]\nlr = [0.01]\nactivation = ["tanh"]\n'
    )
    url = f"sqlite:///{workdir}/s.db"
    args = ("run", "--config", "point.toml", "--engine", "standard", "--max-epochs", "4")
    args += ("--n-trials", "2", "--no-progress", "--storage", url)
    procs = [start_cli(*args, cwd=workdir) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert not any("Traceback" in err for _, err in outs)
    study = _load(url)
    trained = [t for t in study.trials if t.state != TrialState.FAIL]
    assert trained and len({t.user_attrs["run"] for t in trained}) == 1
    for t in study.trials:
        if t.state == TrialState.FAIL:
            assert "has the same parameter set" in t.user_attrs["failed_reason"]
            assert t.user_attrs["seed"] is None  # it trained nothing (found by the harness)
    assert any("starts no more trials" in err for _, err in outs)


def test_sigterm_outside_an_engine_ends_a_command_with_143_and_one_line(tmp_path):
    """Found by the harness: `kill PID` after the engines' handlers were gone (the summary, the
    note) killed the run silently with -15. The dashboard serves until told to stop: the same
    path."""
    url = f"sqlite:///{tmp_path}/s.db"
    optuna.create_study(study_name="sinstudy", storage=url)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_cli("dashboard", "--storage", url, "--port", str(port), cwd=tmp_path)
    assert "optuna-dashboard on" in proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == ["sinstudy: interrupted"], err


def test_a_study_another_run_is_creating_is_waited_for_not_refused(tmp_path, monkeypatch):
    """Found by the harness: a run that looked between another run's create_study and its
    identity label refused the study as "not made by sinstudy"."""
    import json
    import threading

    from study import config
    from study.run import opening

    cfg = config.build(None, study="s", storage=f"sqlite:///{tmp_path}/s.db")
    storage = store.load(cfg.storage)
    study = optuna.create_study(study_name="s", storage=storage)  # labelled a moment later
    label = json.dumps(opening._identity(cfg))
    threading.Timer(1.0, study.set_user_attr, ("identity", label)).start()
    opening.check_study(cfg, storage)  # waits for the label, then finds it the same
    monkeypatch.setattr(opening, "CREATION_WAIT_S", 0.5)
    optuna.create_study(study_name="plain", storage=storage)  # never labelled: a foreign study
    with pytest.raises(opening.ConfigError, match="was not made by sinstudy"):
        opening.check_study(config.build(None, study="plain", storage=cfg.storage), storage)


def test_a_run_that_finds_a_study_being_created_keeps_its_creators_id(tmp_path):
    """Found by the harness (PostgreSQL, two runs at once on a new study): both runs labelled the
    study, each claimed the TensorBoard folder with its own id, the id that stood in storage
    was the other's, and every later run was refused: "holds the runs of another study"."""
    import json
    import threading

    from study import config
    from study.run import opening

    cfg = config.build(
        None, study="s", storage=f"sqlite:///{tmp_path}/s.db", log_dir=f"{tmp_path}/tb"
    )
    storage = store.load(cfg.storage)
    creator = optuna.create_study(study_name="s", storage=storage)  # the other run's, unlabelled

    def label() -> None:  # what the creating run does a moment later
        creator.set_user_attr(opening.UID_ATTR, "the-creators-id")
        creator.set_user_attr("identity", json.dumps(opening._identity(cfg)))

    threading.Timer(1.0, label).start()
    study = opening.open_study(cfg, storage)
    opening.claim_tensorboard_folder(cfg, study)
    assert study.user_attrs[opening.UID_ATTR] == "the-creators-id"
    opening.check_tensorboard_owner(cfg, storage)  # the next run is not refused


def test_a_run_that_finds_no_storage_yet_accepts_the_folder_of_the_run_that_made_it(workdir):
    """Found by the harness (journal, runs started at once on a new file): a run looked for the
    file before the other created it, then found the TensorBoard folder that run had claimed
    meanwhile, and refused it as another study's (exit 2). It is accepted now, and a folder of
    another storage's study is still refused."""
    from study import cli
    from study.run import opening

    url = f"journal:///{workdir}/s.log"
    tiny = ["--config", "tiny.toml", "--max-epochs", "3", "--no-progress", "--storage"]
    check = opening.check_tensorboard_owner

    def the_other_run_first(cfg, storage, *rest):
        if storage is None:  # this run saw no file: the other run makes it and claims the folder
            r = run_cli("run", *tiny, url, "--n-trials", "1", cwd=workdir)
            assert r.returncode == 0, r.stderr
        return check(cfg, storage, *rest)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(opening, "check_tensorboard_owner", the_other_run_first)
        assert cli.main(["run", *tiny, url, "--n-trials", "2"]) == 0
    assert len(_load(url).trials) == 3
    other = f"journal:///{workdir}/other.log"  # another storage, the same study name and folder
    r = run_cli("run", *tiny, other, "--n-trials", "1", cwd=workdir)
    assert r.returncode == 2 and "holds the runs of another study" in r.stderr


def test_a_run_checking_the_folder_while_another_claims_it_never_reads_a_torn_marker(tmp_path):
    """Found by the harness (PostgreSQL, round 189 of seed 161: runs started beside one that
    claimed the folder both refused it, exit 2): every run rewrote the folder's marker in place,
    empty for a moment, and a run checking it then read "" for the study's id. Claims and checks
    at once, for a second: the check never refuses the study's own folder."""
    import threading

    from study import config
    from study.run import opening

    cfg = config.build(
        None, study="s", storage=f"sqlite:///{tmp_path}/s.db", log_dir=f"{tmp_path}/tb"
    )
    storage = store.load(cfg.storage)
    study = opening.open_study(cfg, storage)
    opening.claim_tensorboard_folder(cfg, study)
    stop = time.monotonic() + 1.0
    checks = refused = 0

    def claim() -> None:
        while time.monotonic() < stop:
            opening.claim_tensorboard_folder(cfg, study)

    other = threading.Thread(target=claim)
    other.start()
    while time.monotonic() < stop:
        checks += 1
        try:
            opening.check_tensorboard_owner(cfg, storage)
        except opening.ConfigError:
            refused += 1
    other.join()
    assert checks > 10 and refused == 0, (checks, refused)
    assert [p.name for p in opening._marker(cfg).parent.iterdir()] == [".study-uid"]


def test_a_batched_run_never_trains_a_point_an_earlier_run_stored(workdir):
    """Found by the harness (journal): two runs on one study whose samplers were seeded alike
    drew the same point, and the second trained it again: the storage check looked only at
    trials stored after the engine's mirror was loaded. On a one-point space that an earlier
    run trained, a new run may train nothing and says why."""
    (workdir / "point.toml").write_text(
        TINY_TOML.split("[search_space]")[0]
        + '[search_space]\ndepth = [1]\nwidth = [4]\nlr = [0.01]\nactivation = ["tanh"]\n'
    )
    url = f"sqlite:///{workdir}/s.db"
    args = ("run", "--config", "point.toml", "--engine", "batched", "--max-epochs", "4")
    args += ("--n-trials", "1", "--no-progress", "--storage", url, "--slots", "2")
    first = run_cli(*args, cwd=workdir)
    assert first.returncode == 0, first.stderr
    again = run_cli(*args, cwd=workdir)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
    assert "starts no more trials" in again.stderr
    trained = [t for t in _load(url).trials if t.state != TrialState.FAIL]
    assert len(trained) == 1


def _writer_here(tmp_path: Path, *, claims: int):
    """A study "s" on SQLite and a batched writer's storage side run in this process (its
    messages collected in a list, `claims` budget claims held): (cfg, study, sink, messages)."""

    from study import config
    from study.run import opening
    from study.run.batched.messages import Known
    from study.run.batched.writer import _Sink

    cfg = config.build(
        None,
        study="s",
        storage=f"sqlite:///{tmp_path}/s.db",
        log_dir=f"{tmp_path}/tb",
        artifact_dir=f"{tmp_path}/a",
    )
    study = opening.open_study(cfg, store.load(cfg.storage))
    (tmp_path / "a").mkdir()  # as a run creates it

    class Box(list):
        put = list.append

    box = Box()
    held = Claims(None)
    for _ in range(claims):
        held.add()
    sink = _Sink(cfg, opening.open_study_store(cfg), Known(-1, {}), box, held)
    return cfg, study, sink, box


def test_a_queued_trial_finished_by_another_process_as_it_is_claimed_is_lost_not_a_crash(
    tmp_path, monkeypatch
):
    """Found by the harness (PostgreSQL): a queued trial that another process finished between
    the writer's claim (WAITING -> RUNNING) and its attrs crashed the writer with
    UpdateFinishedTrialError; the engine now loses that trial as one another engine took."""
    from datetime import datetime

    from study.run.batched.messages import Lost, Start

    cfg, study, sink, box = _writer_here(tmp_path, claims=1)
    study.enqueue_trial({"depth": 1, "width": 4, "lr": 0.01, "activation": "tanh"})
    (queued,) = study.get_trials(states=(TrialState.WAITING,))
    take = sink.db.take_queued

    def take_then_fail(study_id, trial_id, *args, **kwargs):  # failed elsewhere at once
        took = take(study_id, trial_id, *args, **kwargs)
        sink.storage.set_trial_state_values(trial_id, TrialState.FAIL)
        return took

    monkeypatch.setattr(sink.db, "take_queued", take_then_fail)
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    trial = optuna.trial.create_trial(
        state=TrialState.RUNNING, params={"x": 0.5}, distributions=dist
    )
    trial.datetime_start = datetime.now()
    sink.start([Start(7, trial, queued=queued._trial_id)])
    assert box == [Lost(7, "another engine took it first", False)]
    assert sink.claims.count() == 0  # its budget claim went back
    # Found next (SQLite): a queued trial another engine claimed and finished already (its
    # mirror had not seen it yet).
    monkeypatch.setattr(sink.db, "take_queued", take)
    study.enqueue_trial({"depth": 2, "width": 4, "lr": 0.01, "activation": "tanh"})
    (done,) = study.get_trials(states=(TrialState.WAITING,))
    sink.storage.set_trial_state_values(done._trial_id, TrialState.RUNNING)
    sink.storage.set_trial_state_values(done._trial_id, TrialState.COMPLETE, [0.5])
    sink.claims.add()
    sink.start([Start(8, trial, queued=done._trial_id)])
    assert box[-1] == Lost(8, "another engine took it first", False)
    assert sink.claims.count() == 0


def test_the_study_keeps_a_best_models_weights_when_a_better_one_is_not_stored(tmp_path):
    """Found by the harness (journal): the best trial had no model artifact. Its engine had
    sent it without weights since a better trial was on its way to storage, and that one was
    not stored (another engine had failed it meanwhile). Weights now go with every trial better
    than the best confirmed stored, and the writer uploads those of the best when it stores."""
    from datetime import datetime

    from study.config import TrainConfig
    from study.run.batched.messages import Dropped, Finish, Start
    from study.trial.model import build_mlp
    from study.views.artifacts import model_state

    cfg, _, sink, box = _writer_here(tmp_path, claims=3)

    def load() -> optuna.Study:
        return optuna.load_study(study_name="s", storage=store.load(cfg.storage))

    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    starts = []
    for key, x in enumerate((0.1, 0.2, 0.3)):
        t = optuna.trial.create_trial(
            state=TrialState.RUNNING, params={"x": x}, distributions=dist
        )
        t.datetime_start = datetime.now()
        starts.append(Start(key, t))
    sink.start(starts)
    ids = dict(sink.held.ids)
    swept = load()
    recovery.fail_and_retry(store.of(swept._storage), swept, 0, max_retries=0)  # a sweep
    tcfg = TrainConfig(depth=1, width=4)
    weights = model_state(build_mlp(tcfg.widths, tcfg.activation))

    def ending(key: int, value: float) -> Finish:
        return Finish(
            key,
            TrialState.COMPLETE,
            value,
            {1: value},
            {},
            {},
            datetime.now(),
            model=weights,
            tcfg=tcfg,
        )

    # #0 best but failed elsewhere, #1 next best, #2 worse: all three came with weights
    sink.finish_all([ending(2, 0.3), ending(0, 0.1), ending(1, 0.2)])
    study = load()
    states = {t.number: t.state for t in study.trials}
    assert states == {0: TrialState.FAIL, 1: TrialState.COMPLETE, 2: TrialState.COMPLETE}
    assert study.best_trial.number == 1 and "model_artifact" in study.trials[1].user_attrs
    assert "model_artifact" not in study.trials[2].user_attrs  # never the best when stored
    assert Dropped(0) in box and ids[0] == study.trials[0]._trial_id


def test_a_journal_hold_and_another_threads_write_wait_for_each_other(tmp_path, monkeypatch):
    """Found by the harness (journal, "did not possess lock"): the writer held the file lock for
    a check and then needed Optuna's thread lock, which its heartbeat thread held while waiting
    for the file lock; after the grace period the heartbeat broke the writer's lock, whose
    release then failed. Both locks are now taken in one order."""
    import threading

    monkeypatch.setattr(journal, "JOURNAL_LOCK_GRACE_S", 3)
    storage = store.open_store(store.parse(f"journal:///{tmp_path}/s.log")).optuna
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    order: list[str] = []

    def beat() -> None:  # as the writer's heartbeat thread does
        storage.set_trial_system_attr(trial._trial_id, "beat", 1)
        order.append("beat")

    with store.of(storage)._locked():
        thread = threading.Thread(target=beat)
        thread.start()
        time.sleep(4)  # past the grace period: the beat must wait, not break the lock
        storage.get_all_trials(study._study_id)  # a call of the hold (the duplicate check)
        order.append("hold")
    thread.join(10)
    assert order == ["hold", "beat"]
    assert storage.get_trial(trial._trial_id).system_attrs["beat"] == 1


def test_workers_of_a_run_killed_as_a_group_wind_down_quietly(workdir):
    """Found by chaos.py (seed 81): `kill -9` of the run's process group killed the parent and
    the resource tracker it shared with its workers (which live in groups of their own and wind
    down when their parent is gone); each worker's semaphores then went to a tracker relaunched
    without them: a KeyError traceback each on the run's stderr."""
    (workdir / "slow.toml").write_text(SLOW_TOML)
    url = f"sqlite:///{workdir}/s.db"
    common = ("run", "--config", "slow.toml", "--max-epochs", "3000", "--no-progress")
    proc = start_cli(*common, "--storage", url, "--n-trials", "8", "--workers", "2", cwd=workdir)
    _wait_running(url, 2, proc)
    workers = spawned_children(proc.pid)
    assert len(workers) == 2
    os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=90)  # the workers hold the pipes until they end
    assert proc.returncode == -9
    assert "Traceback" not in err and "KeyError" not in err, err
    deadline = time.time() + 30
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not [w for w in workers if Path(f"/proc/{w}").exists()]
    assert not _load(url).get_trials(states=(TrialState.RUNNING,))  # their writers ended them


def test_a_worker_can_have_a_resource_tracker_of_its_own():
    """pool._own_resource_tracker resets CPython's private tracker state: this fails when the
    names it leans on change."""
    from multiprocessing import resource_tracker

    tracker = resource_tracker._resource_tracker
    assert {"_fd", "_pid"} <= set(vars(tracker))
    code = (
        "import os; from multiprocessing import resource_tracker as r; "
        "from study.run import pool; r.ensure_running(); first = r._resource_tracker._pid; "
        "pool._own_resource_tracker(); r.ensure_running(); "
        "assert r._resource_tracker._pid not in (None, first); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


def test_a_signal_after_the_summary_does_not_kill_a_finished_run(workdir):
    """Found by chaos.py (seed 81): SIGTERM landing after a run printed its summary killed it
    (status -15): Python restores the default dispositions before it frees its modules, for a
    long moment with torch loaded. A finished command now exits with its own status."""
    proc = start_cli(
        "run",
        "--config",
        "tiny.toml",
        "--max-epochs",
        "6",
        "--no-progress",
        "--n-trials",
        "2",
        cwd=workdir,
    )
    for line in proc.stdout:
        if line.startswith("dashboard"):  # the summary's last line
            break
    time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, 143), (proc.returncode, err)  # 143: main had not returned yet
    assert "Traceback" not in err


def test_workers_whose_parent_dies_as_they_start_stop_without_a_traceback(workdir):
    """Found by chaos.py (seed 121, after seed 81's fix): `kill -9` of a `--workers 2` run's
    parent while its workers were starting. A worker read its parent's pid once started
    (getppid(): by then the reaper's), so it never saw the parent go; and the parent's resource
    tracker, with its last user gone, unlinked the budget's semaphores, so the writer the worker
    started then died opening them (a traceback, "the storage writer process died")."""
    (workdir / "slow.toml").write_text(SLOW_TOML)
    url = f"sqlite:///{workdir}/s.db"
    common = ("run", "--config", "slow.toml", "--max-epochs", "3000", "--no-progress")
    proc = start_cli(*common, "--storage", url, "--n-trials", "8", "--workers", "2", cwd=workdir)
    deadline = time.time() + 60
    while len(workers := spawned_children(proc.pid)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)  # the parent alone, while its workers import
    _, err = proc.communicate(timeout=120)  # the workers hold the pipes until they end
    assert "Traceback" not in err and "writer process died" not in err, err
    deadline = time.time() + 30
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not [w for w in workers if Path(f"/proc/{w}").exists()]
    if Path(url.split(":///", 1)[1]).exists():
        assert not _load(url).get_trials(states=(TrialState.RUNNING,))


def test_curves_of_a_trial_a_sweep_failed_are_skipped_on_the_journal(tmp_path):
    """Found by the harness (seed 181, journal, a run's processes starved past the grace
    period): another run's sweep failed the run's trials, and the writer's next curves job
    raised UpdateFinishedTrialError on the journal, which killed the writer."""

    storage = store.load(f"journal:///{tmp_path}/s.log")
    study = optuna.create_study(study_name="s", storage=storage)
    failed, running = study.ask(), study.ask()
    storage.set_trial_state_values(failed._trial_id, TrialState.FAIL)
    store.of(storage).append_values(
        {failed._trial_id: {1: 0.5}, running._trial_id: {1: 0.25, 2: 0.125}}
    )
    got = {t.number: t.intermediate_values for t in study.get_trials()}
    assert got == {0: {}, 1: {1: 0.25, 2: 0.125}}


def test_a_dead_writers_trials_that_a_sweep_failed_give_their_claims_to_the_retries(tmp_path):
    """Found with the harness's case (seed 181): a worker's writer died after another run's
    sweep had failed its trials and queued their retries; the engine gave back only the claims
    of trials it failed itself, so the run's replacement worker found its budget spent and the
    run ended short, its retries left WAITING."""
    import torch

    from study import config
    from study.run import opening
    from study.run.batched.engine import BatchedEngine

    cfg = config.build(None, study="s", storage=f"sqlite:///{tmp_path}/s.db", n_trials=3)
    study = opening.open_study(cfg, store.load(cfg.storage))
    swept, mine, done = study.ask(), study.ask(), study.ask()
    # another run's sweep: FAIL, retry queued
    recovery.fail_and_retry(store.of(study._storage), study, swept.number, 1)
    study.tell(done, 0.5)  # stored by the writer before it died: it counts
    budget = Budget(3, None)
    assert all(budget.claim() for _ in range(3))
    engine = BatchedEngine(
        cfg, study.get_trials(), torch.device("cpu"), slots=4, seed=0, on_trial=print
    )
    for handle, trial in ((10, swept), (11, mine), (12, done)):
        engine.ledger.hand_over(handle, 0)
        engine.ledger.started(handle, trial.number)
    engine.settle(store.of(study._storage), study, budget, 0)
    assert budget.reserved() == 2  # kept for the two retries, which the replacement takes
    assert budget.claim(queued=True) and budget.claim(queued=True)
    assert not budget.claim(queued=True) and not budget.claim()  # the complete one counted
    states = [t.state for t in study.get_trials()]
    assert states.count(TrialState.WAITING) == 2 and states[mine.number] == TrialState.FAIL


def test_a_stop_that_lands_in_a_finaliser_still_stops_the_command_without_a_traceback(
    tmp_path, monkeypatch
):
    """Found by the harness (seed 191, journal, standard engine, SIGTERM to the parent): the
    signal's handler raised while Python ran a finaliser, which printed "Exception ignored ...
    Traceback ... Interrupted: SIGTERM" and dropped the stop. Outside an engine the signal is now
    sent again, to land in ordinary code; inside one it is recorded like a first signal."""
    script = tmp_path / "finaliser.py"
    script.write_text(
        "import signal, sys, time\n"
        "from study import cli\n"
        "class Finalised:\n"
        "    def __del__(self):  # the signal's handler runs here, as in a weakref callback\n"
        "        cli._terminate(signal.SIGTERM, None)\n"
        "def command(args):\n"
        "    Finalised()\n"
        "    time.sleep(10)\n"
        "    print('ran on', file=sys.stderr)\n"
        "    return 0\n"
        "cli.cmd_best = command\n"
        "cli.entry(['best'])\n"
    )
    r = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert r.returncode == 143 and r.stderr == "sinstudy: interrupted\n", r.stderr
    from study.run import interrupt

    monkeypatch.setattr(interrupt, "_received", 0)  # put back after: later tests train here
    with interrupt.handle_signals():  # an engine's: the stop is recorded for its next epoch

        class Finalised:
            def __del__(self):
                raise interrupt.Interrupted(signal.SIGTERM)

        Finalised()
        assert interrupt.requested() == signal.SIGTERM


def test_a_writer_that_wakes_after_its_trial_was_failed_stores_no_more_of_its_values(workdir):
    """A writer stopped (a loaded machine, SIGSTOP) while the trainer goes on holds the epochs
    it was sent; its trial is failed meanwhile (optuna-dashboard's button, a sweep). When the
    writer wakes it stores what it holds: before, the epochs after the trial's FAIL too (the
    bulk insert did not check the state, as Optuna's own API does); now none of them."""
    (workdir / "slow.toml").write_text(SLOW_TOML)
    url = f"sqlite:///{workdir}/s.db"
    proc = start_cli(
        "run", "--config", "slow.toml", "--no-progress", "--storage", url,
        "--max-epochs", "4000", "--n-trials", "1", "--slots", "1", cwd=workdir,
    )  # fmt: skip
    try:
        victim = _wait_running(url, 1, proc)[0]
        (writer,) = spawned_children(proc.pid)
        os.kill(writer, signal.SIGSTOP)
        time.sleep(2)  # the trainer's epochs pile up for the stopped writer
        storage = store.load(url)
        storage.set_trial_state_values(victim._trial_id, TrialState.FAIL)
        at_fail = len(storage.get_trial(victim._trial_id).intermediate_values)
        os.kill(writer, signal.SIGCONT)
        time.sleep(2 * SYNC_S + 1)  # the writer's backlog written, and a sync after it
        assert len(storage.get_trial(victim._trial_id).intermediate_values) == at_fail
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the writer too, stopped or not


def test_a_retry_queued_while_the_writer_lags_is_waited_for_not_left_waiting(workdir):
    """Chaos seed 201, round 87: under load a sweep's retry reached a run's mirror after the
    run's wait for it (three syncs' time) ran out; the run gave the claim to a new trial and
    left the retry WAITING. A stopped writer stands for the loaded one: the wait is counted in
    its syncs, so the run takes the retry once the writer goes on."""
    # a trial trains for a minute: a slot of its own has no other trials to share the epoch
    (workdir / "slow.toml").write_text(SLOW_TOML.replace("n_train = 128", "n_train = 8192"))
    url = f"sqlite:///{workdir}/s.db"
    proc = start_cli(
        "run", "--config", "slow.toml", "--no-progress", "--storage", url,
        "--max-epochs", "4000", "--n-trials", "1", "--slots", "1", cwd=workdir,
    )  # fmt: skip
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        victim = _wait_running(url, 1, proc)[0]
        storage = store.load(url)
        # a sweep's first half: the trial FAIL; the trainer stops it and waits for a retry
        storage.set_trial_state_values(victim._trial_id, TrialState.FAIL)
        deadline = time.time() + 60
        while not any("was marked FAIL by another process" in line for line in err):
            assert time.time() < deadline and proc.poll() is None, "".join(err)
            time.sleep(0.1)
        (writer,) = spawned_children(proc.pid)
        os.kill(writer, signal.SIGSTOP)  # a writer the load keeps from running
        study = _load(url)  # the sweep's second half: the retry, queued
        recovery.StaleRetry(1)(study, study._storage.get_trial(victim._trial_id))
        time.sleep(4 * SYNC_S + 1)  # longer than the wait, counted in seconds, lasted
        os.kill(writer, signal.SIGCONT)
        deadline = time.time() + 60
        while True:  # the retry taken, or a new trial in its place
            trials = _load(url).trials
            if len(trials) > 2 or trials[1].state != TrialState.WAITING:
                break
            assert time.time() < deadline and proc.poll() is None, "".join(err)
            time.sleep(0.2)
        assert [t.state for t in trials] == [TrialState.FAIL, TrialState.RUNNING], trials
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the writer too, stopped or not
    reader.join(timeout=10)
    assert proc.returncode == 130 and "Traceback" not in "".join(err), "".join(err)


@pytest.mark.parametrize("engine", ["batched", "standard"])
def test_a_retry_of_a_trial_that_kept_another_trials_seed_trains_with_seeds_of_its_own(
    workdir, engine
):
    """Chaos seed 201, rounds 109 and 112: a standard trial stored its seed (#28's), its run was
    killed before the check that would have moved it, and its retry trained with #28's seed.
    A seed is now checked as it is stored (Store.claim_seed), and a retry whose inherited seed
    another trial holds (a study such a run left behind) trains with its own."""
    url = f"sqlite:///{workdir}/s.db"
    common = ("run", "--config", "tiny.toml", "--no-progress", "--storage", url)
    r = run_cli(*common, "--seed", "1", "--n-trials", "1", cwd=workdir)
    assert r.returncode == 0, r.stderr
    study = _load(url)
    first = study.trials[0]
    # the killed run's trial: #0's seed, stored unchecked, then failed and queued by a sweep
    storage = study._storage
    killed = storage.create_new_trial(study._study_id)
    other = "tanh" if first.params["activation"] != "tanh" else "relu"
    for name, value in {**first.params, "activation": other}.items():
        dist = first.distributions[name]
        storage.set_trial_param(killed, name, dist.to_internal_repr(value), dist)
    storage.set_trial_user_attr(killed, "seed", first.user_attrs["seed"])
    assert recovery.fail_and_retry(store.of(study._storage), study, 1, max_retries=1)
    r = run_cli(*common, "--seed", "0", "--n-trials", "1", "--engine", engine, cwd=workdir)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    trials = _load(url).trials
    assert len(trials) == 3 and trials[2].system_attrs["failed_trial"] == 1
    assert trials[2].state.is_finished() and trials[2].state != TrialState.FAIL
    assert trials[2].user_attrs["seed"] != first.user_attrs["seed"]  # #1 trained nothing
