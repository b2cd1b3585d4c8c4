"""The storage's environment failing under a run, for real: a full disk (a small tmpfs this test
mounts; CI runs as root) and a PostgreSQL server this test starts on a spare port and stops.
What is checked: the run ends with one line naming the cause and its fix, never Optuna's "invalid
data in the commit", and no traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from conftest import run_cli, start_cli
from optuna.trial import TrialState

from study import store

FREE_KB = 160  # what the full disk leaves: a few dozen tiny trials


@pytest.fixture
def full_disk() -> Iterator[Path]:
    """A 3 MB tmpfs filled but for FREE_KB."""
    where = Path(tempfile.mkdtemp(prefix="sinstudy-full-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        where.rmdir()
        pytest.skip(f"mounting a tmpfs needs root: {mounted.stderr.decode().strip()}")
    try:
        leave(where, FREE_KB)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        where.rmdir()


def leave(disk: Path, kb: int) -> None:
    """Fill the tmpfs `disk` but for `kb` KiB."""
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    filler.write_bytes(b"\0" * (shutil.disk_usage(disk).free - kb * 1024))


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_full_disk_under_the_storage_is_named_with_its_file(workdir, full_disk, kind):
    """Before: SQLite ended with Optuna's "An exception is raised during the commit. This
    typically happens due to invalid data in the commit", the journal with "OSError: [Errno
    28] No space left on device" naming no file. SQLite's full disk is waited out first
    (storage_outage, 2 s here); a journal's append that a full disk may have cut is not."""
    path = full_disk / ("s.db" if kind == "sqlite" else "s.log")
    url = f"sqlite:///{path}" if kind == "sqlite" else f"journal:///{path}"
    toml = _outage_toml(workdir, 2)
    args = ["--config", toml, "--no-progress", "--max-epochs", "40", "--n-trials", "2000"]
    r = run_cli("run", "--storage", url, *args, cwd=workdir)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1, r.stderr
    # from the run, or from its storage writer ("sinstudy: error: storage writer: disk ...")
    assert last.startswith("sinstudy: error: "), r.stderr
    assert f"disk full: cannot write {path};" in last, r.stderr
    assert "--storage" in last and "invalid data" not in r.stderr and "Traceback" not in r.stderr
    waited = "past [study] storage_outage (2 s)" in last
    assert waited == (kind == "sqlite"), r.stderr


def test_a_full_disk_under_sqlite_freed_while_the_run_waits_loses_nothing(workdir, full_disk):
    """The disk fills under the SQLite file while trials train; space is freed while the run
    waits: it goes on, and every trial of its budget is stored, none left RUNNING."""
    path = full_disk / "s.db"
    proc = start_cli(
        "run", "--config", _outage_toml(workdir, 120), "--no-progress", "--storage",
        f"sqlite:///{path}", "--max-epochs", "40", "--n-trials", "150", cwd=workdir,
    )  # fmt: skip
    try:
        seen = []
        for line in proc.stderr:  # until the run says it waits
            seen.append(line)
            if "sinstudy: storage unavailable: disk full" in line:
                break
        assert proc.poll() is None, "".join(seen)
        leave(full_disk, 2048)
        _, rest = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    err = "".join(seen) + rest
    assert proc.returncode == 0, err
    assert "sinstudy: storage back after " in err and "Traceback" not in err, err
    trials = optuna.load_study(study_name="sinstudy", storage=f"sqlite:///{path}").trials
    states = {t.state for t in trials}
    assert len(trials) == 150 and states <= {TrialState.COMPLETE, TrialState.PRUNED}, states


def test_a_cut_journal_on_a_full_disk_is_left_as_it_is_with_no_half_copy(full_disk):
    """The repair's byte-exact copy does not fit: it raises, and neither a 0-byte `.bak` (left
    before) nor a change to the journal remains."""
    from study.store.journal import repair

    journal = full_disk / "s.log"
    cut = b'{"op_code": 0}\n' * 400 + b'{"op_co'
    journal.write_bytes(cut)
    leave(full_disk, 4)
    with pytest.raises(OSError):
        repair(journal)
    assert journal.read_bytes() == cut and not list(full_disk.glob("*.bak"))
    leave(full_disk, 64)
    assert "kept at" in repair(journal)
    assert [b.read_bytes() for b in full_disk.glob("*.bak")] == [cut]


# ------------------------------------------------------------------ the views' folders


def _views_on(disk: Path, workdir: Path) -> Path:
    """A config whose TensorBoard and artifact folders are on `disk`, the study elsewhere."""
    config = workdir / "views.toml"
    config.write_text(
        f'[study]\nlog_dir = "{disk}/tb"\nartifact_dir = "{disk}/artifacts"\n'
        + (workdir / "tiny.toml").read_text()
    )
    return config


@pytest.mark.parametrize("engine", ["batched", "standard"])
def test_a_view_folder_that_fills_costs_its_view_not_a_trial(workdir, full_disk, engine):
    """The TensorBoard and artifact folders fill under the run; the storage is elsewhere.
    Before: the run aborted (exit 1) blaming the "storage writer", naming no folder, with a
    thread's traceback, and left a truncated artifact file that no trial references."""
    leave(full_disk, 72)  # the start's probe fits; a dozen trials' runs and weights do not
    config = _views_on(full_disk, workdir)
    url = f"sqlite:///{workdir}/s.db"
    args = ["--config", str(config), "--storage", url, "--engine", engine, "--no-progress"]
    r = run_cli("run", *args, "--max-epochs", "40", "--n-trials", "12", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "storage writer" not in r.stderr, r.stderr
    warned = [line for line in r.stderr.splitlines() if "warning: cannot write" in line]
    tb = f"sinstudy: warning: cannot write the TensorBoard folder '{full_disk}/tb' (disk full)"
    assert [w for w in warned if w.startswith(tb)] and len(warned) <= 2, r.stderr
    study = optuna.load_study(study_name="sinstudy", storage=url)
    trials = study.get_trials()
    done = (TrialState.COMPLETE, TrialState.PRUNED)
    assert sum(t.state in done for t in trials) == 12 and len(trials) == 12
    # no file in the artifact folder that no trial references (a partial one was left before)
    referenced = {
        meta.artifact_id
        for t in trials
        for meta in optuna.artifacts.get_all_artifact_meta(t, storage=study._storage)
    }
    assert {f.name for f in (full_disk / "artifacts").iterdir()} <= referenced
    best = min((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert {"model_artifact", "model_missing"} & set(best.user_attrs), best.user_attrs
    # the views read the study as it is
    shown = run_cli("best", "--storage", url, cwd=workdir)
    assert shown.returncode == 0, shown.stderr
    if "model_missing" in best.user_attrs:
        assert "model artifact not stored (disk full: " in shown.stdout


def test_a_view_folder_that_cannot_take_a_file_refuses_the_run_before_storing(workdir, full_disk):
    """A rerun on the still-full folder took the retries and failed them at epoch 0 before."""
    leave(full_disk, 0)
    config = _views_on(full_disk, workdir)
    url = f"sqlite:///{workdir}/s.db"
    r = run_cli("run", "--config", str(config), "--storage", url, "--no-progress", cwd=workdir)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"sinstudy: error: cannot write log_dir '{full_disk}/tb' (disk full in "
        f"'{full_disk}'); free space on its disk or set [study] log_dir to a writable folder"
    ]
    assert not (workdir / "s.db").exists()


# ------------------------------------------------------------------ a PostgreSQL of its own


@pytest.fixture
def own_pg() -> Iterator:
    """A PostgreSQL server started for this test on a spare port (the chaos harness's
    `OwnServer`; the study goes in its `postgres` database). Stopped and removed afterwards."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from chaos import OwnServer

    try:
        pg = OwnServer()
    except RuntimeError as e:  # no initdb / pg_ctl
        pytest.skip(
            f"a PostgreSQL server of the test's own cannot start ({e}); apt install postgresql"
        )
    try:
        yield pg
    finally:
        pg.remove()


def _outage_toml(workdir: Path, seconds: int) -> str:
    text = (workdir / "tiny.toml").read_text()
    (workdir / "outage.toml").write_text(f"{text}\n[study]\nstorage_outage = {seconds}\n")
    return "outage.toml"


def _run_on(pg, workdir: Path, engine: str, toml: str, epochs: int, trials: int):
    return start_cli(
        "run", "--config", toml, "--no-progress", "--storage", pg.url, "--engine", engine,
        "--max-epochs", str(epochs), "--n-trials", str(trials), cwd=workdir,
    )  # fmt: skip


def _until_training(proc: subprocess.Popen, url: str) -> None:
    deadline = time.time() + 60
    while True:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        try:
            study = optuna.load_study(study_name="sinstudy", storage=store.load(url))
            if study.get_trials(states=(TrialState.RUNNING,)):
                return
        except Exception:  # the study is still being created
            pass
        time.sleep(0.2)


def _ended(proc: subprocess.Popen, timeout: float = 180) -> str:
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    return err


@pytest.mark.parametrize("engine", ["batched", "standard"])
def test_a_postgresql_server_lost_past_the_outage_bound_is_named_with_its_host(
    workdir, own_pg, engine
):
    """The server stops for good while a run trains. Before: exit 1 at once with
    "StorageInternalError: An exception is raised during the commit. This typically happens
    due to invalid data in the commit, e.g. exceeding max length" (batched), or an
    UnboundLocalError from inside Optuna's trial loop (standard). Now the run waits
    storage_outage (3 s here), then stops with one line."""
    proc = _run_on(own_pg, workdir, engine, _outage_toml(workdir, 3), 4000, 4)
    _until_training(proc, own_pg.url)
    own_pg.stop()
    err = _ended(proc, 120)
    assert proc.returncode == 1, err
    assert f"the PostgreSQL server at 127.0.0.1:{own_pg.port} cannot be reached (" in err, err
    assert "sinstudy: storage unavailable: " in err and "past [study] storage_outage (3 s)" in err
    assert "invalid data" not in err and "Traceback" not in err, err


@pytest.mark.parametrize("engine", ["batched", "standard"])
def test_a_postgresql_restart_under_a_run_is_waited_out_with_nothing_lost(workdir, own_pg, engine):
    """The server stops for 4 s while trials train, then starts again. Before: exit 1, the
    trials left RUNNING until the next run retried them (batched); exit 1 or 137 lines of
    tracebacks (standard). Now the run says so twice and ends as if nothing happened: every
    trial of its budget finished, none RUNNING, none failed."""
    proc = _run_on(own_pg, workdir, engine, "tiny.toml", 300, 6)
    _until_training(proc, own_pg.url)
    own_pg.stop()
    time.sleep(4)
    own_pg.start()
    err = _ended(proc)
    assert proc.returncode == 0, err
    assert "sinstudy: storage unavailable: the PostgreSQL server at 127.0.0.1:" in err, err
    assert "sinstudy: storage back after " in err and "Traceback" not in err, err
    trials = optuna.load_study(study_name="sinstudy", storage=store.load(own_pg.url)).trials
    states = [t.state for t in trials]
    assert len(trials) == 6 and set(states) <= {TrialState.COMPLETE, TrialState.PRUNED}, states
    for t in trials:  # every epoch stored once, in order, whatever waited
        assert sorted(t.intermediate_values) == list(range(1, len(t.intermediate_values) + 1))


def test_a_run_started_while_the_server_is_down_starts_when_it_answers(workdir, own_pg):
    own_pg.stop()
    proc = _run_on(own_pg, workdir, "batched", "tiny.toml", 30, 2)
    time.sleep(3)
    assert proc.poll() is None
    own_pg.start()
    err = _ended(proc)
    assert proc.returncode == 0, err
    assert "storage unavailable: cannot connect to PostgreSQL at " in err, err
    assert "the run starts when it answers, for up to 5 min 0 s" in err, err
    assert (
        len(optuna.load_study(study_name="sinstudy", storage=store.load(own_pg.url)).trials) == 2
    )
