from __future__ import annotations

import re
import sqlite3
import threading
import time
from datetime import datetime

import optuna
import pytest

from study import store
from study.errors import StorageError
from study.store import journal, sqlite


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("mongodb://localhost/x", "unsupported storage URL"),
        ("sqlite://", "names no file"),
        ("sqlite:///:memory:", "names no file"),
        ("journal://", "names no file"),
        ("postgresql://localhost:5432", "names no database"),
        ("not a url", "unsupported storage URL"),
    ],
)
def test_bad_urls(url, fragment):
    with pytest.raises(StorageError, match=fragment):
        store.check(url)


def test_new_sqlite_file_is_created_on_open_not_on_check(tmp_path):
    url = f"sqlite:///{tmp_path}/sub/dir/s.db"
    parsed = store.check(url)
    assert not (tmp_path / "sub").exists()  # check() writes nothing
    optuna.create_study(storage=store.open_store(parsed).optuna, study_name="x")
    assert (tmp_path / "sub/dir/s.db").exists()


def test_corrupt_sqlite_file(tmp_path):
    f = tmp_path / "s.db"
    f.write_bytes(b"this is not a database" * 10)
    with pytest.raises(StorageError, match="not a SQLite database"):
        store.check(f"sqlite:///{f}")


def test_foreign_sqlite_database(tmp_path):
    f = tmp_path / "other.db"
    con = sqlite3.connect(f)
    con.execute("CREATE TABLE customers (id INTEGER, name TEXT)")
    con.commit()
    con.close()
    with pytest.raises(StorageError, match="another program's SQLite database"):
        store.check(f"sqlite:///{f}")


def test_path_below_a_file_cannot_be_written(tmp_path):
    # The unwritable case that holds for root as well (CI runs as root, which ignores modes).
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StorageError, match="cannot write") as e:
        store.check(f"sqlite:///{tmp_path}/afile/s.db")
    assert e.value.exit_code == 1


def test_journal_file_round_trip_and_foreign_file(tmp_path):
    url = f"journal:///{tmp_path}/j.log"
    study = optuna.create_study(storage=store.load(url), study_name="j")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert len(optuna.load_study(study_name="j", storage=store.load(url)).trials) == 2
    (tmp_path / "notes.log").write_text("hello\n")
    with pytest.raises(StorageError, match="not an Optuna journal"):
        store.check(f"journal:///{tmp_path}/notes.log")


def test_unreachable_postgresql_is_reported_quickly():
    # Port 9 (discard) on loopback has no PostgreSQL: refused at once, exit code 1 (environment).
    with pytest.raises(StorageError, match="cannot connect to PostgreSQL") as e:
        store.check("postgresql://postgres@127.0.0.1:9/test")
    assert e.value.exit_code == 1


def test_a_journal_lock_left_by_a_killed_process_is_broken(tmp_path, monkeypatch):
    """A process killed mid-append leaves Optuna's journal lock behind; the next run must break
    it after the lock's grace period instead of waiting forever (a relative journal path made
    the lock a dangling symlink that was never broken)."""
    import time

    monkeypatch.chdir(tmp_path)
    first = store.open_store(store.parse("journal:///storage/s.log")).optuna
    optuna.create_study(storage=first, study_name="a")
    first._backend._lock.acquire()  # taken and never released: its holder "died"
    t0 = time.monotonic()
    optuna.create_study(
        storage=store.open_store(store.parse("journal:///storage/s.log")).optuna, study_name="b"
    )
    assert time.monotonic() - t0 < journal.JOURNAL_LOCK_GRACE_S + 10


def test_a_schema_another_program_creates_meanwhile_is_opened_on_the_next_try(
    tmp_path, monkeypatch
):
    """Plain Optuna (or the dashboard, or a run on another machine) creating the schema while a
    run does made the run fail with "table studies already exists" (or a UNIQUE constraint on
    alembic's version row); other errors still fail."""
    import sqlalchemy.exc

    url = f"sqlite:///{tmp_path}/s.db"
    real, calls = sqlite.SQLiteStorage, []

    def racing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # the other program wins the race
            optuna.storages.RDBStorage(url)
            raise sqlalchemy.exc.OperationalError(
                "CREATE TABLE studies",
                {},
                sqlite3.OperationalError("table studies already exists"),
            )
        return real(*args, **kwargs)

    monkeypatch.setattr(sqlite, "SQLiteStorage", racing)
    optuna.create_study(storage=store.open_store(store.check(url)).optuna, study_name="x")
    assert len(calls) == 2

    # or the other program wrote alembic's version row first (a reader polling the file as a
    # run creates it: sqlite3.IntegrityError)
    def version_race(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise sqlalchemy.exc.IntegrityError(
                "INSERT INTO alembic_version",
                {},
                sqlite3.IntegrityError("UNIQUE constraint failed: alembic_version.version_num"),
            )
        return real(*args, **kwargs)

    monkeypatch.setattr(sqlite, "SQLiteStorage", version_race)
    store.open_store(store.check(url))
    assert len(calls) == 4

    def broken(*args, **kwargs):
        calls.append(1)
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, sqlite3.OperationalError("disk I/O"))

    monkeypatch.setattr(sqlite, "SQLiteStorage", broken)
    with pytest.raises(sqlalchemy.exc.OperationalError, match="disk I/O"):
        store.open_store(store.check(url))
    assert len(calls) == 5


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_read_only_storage_reads_studies_and_cannot_write(tmp_path, request, kind):
    """What readers (best, plot, report) open: the study is there, and a write is refused by
    the database itself (SQLite's mode=ro, PostgreSQL's read-only transactions)."""
    url = f"sqlite:///{tmp_path}/s.db" if kind == "sqlite" else request.getfixturevalue("pg_url")
    study = optuna.create_study(study_name="s", storage=store.load(url))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    ro = store.open_store(store.check(url, read_only=True), read_only=True).optuna
    assert [t.value for t in optuna.load_study(study_name="s", storage=ro).trials] == [
        t.value for t in study.trials
    ]
    with pytest.raises(Exception) as refused:  # Optuna wraps the database's error
        ro.create_new_study([optuna.study.StudyDirection.MINIMIZE], "other")
    e = refused.value
    assert re.search("read.?only", f"{e} {e.__cause__} {e.__context__}", re.I), repr(e)
    assert optuna.get_all_study_names(store.load(url)) == ["s"]


def test_a_sqlite_file_left_without_its_indexes_gets_them_back(tmp_path):
    """A run killed while it created a new SQLite file, between Optuna's CREATE TABLE studies
    and its unique index on the name (each CREATE commits alone in SQLite): the next open adds
    the index, so two runs cannot each create a study of one name; a file that already holds
    two is refused with one line."""
    import sqlite3

    url = f"sqlite:///{tmp_path}/s.db"
    store.load(url).engine.dispose()
    con = sqlite3.connect(tmp_path / "s.db")
    con.execute("DROP INDEX ix_studies_study_name")
    con.commit()
    con.close()
    opened = store.load(url)
    optuna.create_study(study_name="s", storage=opened)
    with pytest.raises(optuna.exceptions.DuplicatedStudyError):
        optuna.create_study(study_name="s", storage=store.load(url))
    # a file that already holds two studies of one name
    con = sqlite3.connect(tmp_path / "s.db")
    con.execute("DROP INDEX ix_studies_study_name")
    con.execute("INSERT INTO studies (study_name) VALUES ('s')")
    con.commit()
    con.close()
    with pytest.raises(StorageError, match="should be unique.*optuna delete-study"):
        store.load(url)


def test_two_engines_taking_one_queued_trial_at_once_on_sqlite_take_it_once(tmp_path, monkeypatch):
    """Optuna takes a WAITING trial by reading its state and then writing RUNNING; on SQLite
    both engines read WAITING before either writes (held here at that point), and both trained
    it. SQLiteStorage takes it in one conditional UPDATE, and otherwise answers as Optuna does."""
    url = f"sqlite:///{tmp_path}/s.db"
    s = store.open_store(store.parse(url)).optuna
    ours = optuna.create_study(storage=s, study_name="ours")
    for _ in range(3):
        ours.enqueue_trial({"x": 1.0})
    ids = [t._trial_id for t in ours.get_trials()]
    both_read = threading.Barrier(2)
    find = optuna.storages._rdb.models.TrialModel.find_or_raise_by_id

    def find_then_wait(*args, **kwargs):
        found = find(*args, **kwargs)
        try:  # the other engine reads now too, unless the take is one step
            both_read.wait(timeout=2)
        except threading.BrokenBarrierError:
            pass
        return found

    model = optuna.storages._rdb.models.TrialModel
    monkeypatch.setattr(model, "find_or_raise_by_id", find_then_wait)
    took: list[bool] = []

    def engine() -> None:
        mine = store.open_store(store.parse(url)).optuna
        took.append(mine.set_trial_state_values(ids[0], optuna.trial.TrialState.RUNNING))

    threads = [threading.Thread(target=engine) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(took) == [False, True]
    monkeypatch.undo()
    # as Optuna's: start time set, a RUNNING trial not taken again, a finished one raises
    ref = optuna.create_study(storage=optuna.storages.RDBStorage(url), study_name="ref")
    ref.enqueue_trial({"x": 1.0})
    ref_id = ref.get_trials()[0]._trial_id
    assert ref._storage.set_trial_state_values(ref_id, optuna.trial.TrialState.RUNNING)
    mine, theirs = s.get_trial(ids[0]), ref._storage.get_trial(ref_id)
    assert (mine.state, mine.params, mine.system_attrs) == (
        theirs.state,
        theirs.params,
        theirs.system_attrs,
    )
    assert mine.datetime_start is not None and mine.datetime_complete is None
    assert not s.set_trial_state_values(ids[0], optuna.trial.TrialState.RUNNING)
    s.set_trial_state_values(ids[1], optuna.trial.TrialState.COMPLETE, [1.0])
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        s.set_trial_state_values(ids[1], optuna.trial.TrialState.RUNNING)
    assert isinstance(s, optuna.storages.RDBStorage)


def test_a_stale_check_and_an_engine_ending_one_trial_at_once_on_sqlite_end_it_once(
    tmp_path, monkeypatch
):
    """A trial failed as stale by one engine (Optuna's read, then write) while its own engine
    ends it (sinstudy's bulk finish): on SQLite the FAIL was written over the COMPLETE, both
    said they ended it, and the completed trial was retried. One of them ends it now."""
    from study.store.base import Ending

    url = f"sqlite:///{tmp_path}/s.db"
    s = store.open_store(store.parse(url)).optuna
    study = optuna.create_study(storage=s, study_name="s")
    tid = study.ask()._trial_id
    read = threading.Event()
    find = optuna.storages._rdb.models.TrialModel.find_or_raise_by_id

    def find_then_wait(*args, **kwargs):
        found = find(*args, **kwargs)
        read.set()
        time.sleep(1.0)  # the engine ends the trial now, unless the stale check holds the lock
        return found

    model = optuna.storages._rdb.models.TrialModel
    monkeypatch.setattr(model, "find_or_raise_by_id", find_then_wait)
    said: dict[str, bool] = {}

    def stale() -> None:
        mine = store.open_store(store.parse(url)).optuna
        said["stale"] = mine.set_trial_state_values(tid, optuna.trial.TrialState.FAIL)

    def engine() -> None:
        read.wait(30)
        mine = store.open_store(store.parse(url)).optuna
        done = Ending(tid, optuna.trial.TrialState.COMPLETE, 0.5, {}, {}, {}, datetime.now())
        said["engine"] = store.of(mine).finish_trials([done])[0]

    threads = [threading.Thread(target=stale), threading.Thread(target=engine)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    monkeypatch.undo()
    assert said == {"stale": True, "engine": False}, said
    assert s.get_trial(tid).state == optuna.trial.TrialState.FAIL


def test_every_private_optuna_api_named_in_the_list_still_exists(tmp_path):
    """study.store.private names each private Optuna API sinstudy uses; a release that removes
    one fails here, and pyproject.toml allows only the versions tested."""
    import importlib
    import tomllib
    from pathlib import Path

    from study.store.private import PRIVATE_OPTUNA, TESTED_OPTUNA

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert f"optuna{TESTED_OPTUNA}" in pyproject["project"]["dependencies"]
    log = store.open_store(store.parse(f"journal:///{tmp_path}/s.log")).optuna
    study = optuna.create_study(storage=log)
    trial = study.ask()
    # attributes of instances, found on the objects a run holds
    instances = {
        "optuna.storages.JournalStorage": log,
        "optuna.storages.journal.JournalFileBackend": log._backend,
        "optuna.Study": study,
        "optuna.trial.FrozenTrial": study.trials[0],
    }
    assert trial.number == 0
    for name in PRIVATE_OPTUNA:
        owner, attr = name.rsplit(".", 1)
        if owner in instances:
            assert hasattr(instances[owner], attr), name
            continue
        try:
            obj = importlib.import_module(name)
        except ImportError:
            parts = name.split(".")
            for i in range(len(parts) - 1, 0, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:i]))
                    break
                except ImportError:
                    continue
            for part in parts[i:]:
                obj = getattr(obj, part)
        assert obj is not None, name


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "journal"])
def test_no_value_is_stored_after_a_trials_end(tmp_path, request, kind):
    """A trial failed from outside (optuna-dashboard's button, another engine's sweep) gets no
    more intermediate values, however late the writer's batch comes; a running one beside it
    gets its batch whole."""
    url = {
        "sqlite": f"sqlite:///{tmp_path}/s.db",
        "journal": f"journal:///{tmp_path}/s.log",
    }.get(kind) or request.getfixturevalue("pg_url")
    db = store.open_store(store.check(url))
    study = optuna.create_study(study_name="s", storage=db.optuna)
    failed, running = study.ask(), study.ask()
    db.append_values({failed._trial_id: {1: 0.5}, running._trial_id: {1: 0.4}})
    other = optuna.load_study(study_name="s", storage=store.load(url))  # another process's view
    other.tell(failed.number, state=optuna.trial.TrialState.FAIL)
    db.append_values({failed._trial_id: {2: 0.3, 3: 0.2}, running._trial_id: {2: 0.1}})
    trials = optuna.load_study(study_name="s", storage=store.load(url)).trials
    assert trials[0].state == optuna.trial.TrialState.FAIL
    assert (trials[0].intermediate_values, trials[1].intermediate_values) == (
        {1: 0.5},
        {1: 0.4, 2: 0.1},
    )


def _refuse_new_trials(kind: str, url: str, monkeypatch) -> None:
    """Every insert of a trial fails from now on, whichever code inserts it (a full disk, say)."""
    if kind == "journal":

        def refused(*args, **kwargs):
            raise OSError(28, "No space left on device (simulated)")

        monkeypatch.setattr(optuna.storages.JournalStorage, "create_new_trial", refused)
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    with engine.begin() as c:
        if kind == "sqlite":
            c.exec_driver_sql(
                "CREATE TRIGGER refuse_trials BEFORE INSERT ON trials "
                "BEGIN SELECT RAISE(ABORT, 'full'); END"
            )
        else:
            c.exec_driver_sql(
                "CREATE FUNCTION refuse_trials() RETURNS trigger AS $$ BEGIN RAISE 'full'; END $$ "
                "LANGUAGE plpgsql; CREATE TRIGGER refuse_trials BEFORE INSERT ON trials "
                "FOR EACH ROW EXECUTE FUNCTION refuse_trials()"
            )
    engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "journal"])
def test_a_trial_is_never_failed_without_its_retry(tmp_path, request, monkeypatch, kind):
    """Failing a trial and queueing its retry are one step: when the retry cannot be stored,
    the trial stays RUNNING (a later sweep fails and retries it). Before: the FAIL was stored,
    the retry's insert failed, and the parameter set was lost for good."""
    from study.store import recovery

    url = {
        "sqlite": f"sqlite:///{tmp_path}/s.db",
        "journal": f"journal:///{tmp_path}/s.log",
    }.get(kind) or request.getfixturevalue("pg_url")
    study = optuna.create_study(study_name="s", storage=store.load(url))
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    study.set_user_attr("unused", 0)  # (a study attr: the retry copies only the trial's)
    trial.set_user_attr("seed", 7)
    with monkeypatch.context() as m:
        _refuse_new_trials(kind, url, m)
        with pytest.raises(Exception, match="full|No space"):  # the backend's own error
            recovery.fail_and_retry(store.of(study._storage), study, trial.number, max_retries=1)
    if kind != "journal":  # the database refuses inserts until the trigger goes
        import sqlalchemy

        engine = sqlalchemy.create_engine(url)
        with engine.begin() as c:
            on = "" if kind == "sqlite" else " ON trials"
            c.exec_driver_sql(f"DROP TRIGGER refuse_trials{on}")
        engine.dispose()
    fresh = optuna.load_study(study_name="s", storage=store.load(url))
    assert [t.state for t in fresh.trials] == [optuna.trial.TrialState.RUNNING]
    assert recovery.fail_and_retry(store.of(fresh._storage), fresh, trial.number, max_retries=1)
    done = recovery.fail_and_retry(store.of(fresh._storage), fresh, trial.number, max_retries=1)
    assert not done  # done already
    failed, retry = optuna.load_study(study_name="s", storage=store.load(url)).trials
    assert (failed.state, retry.state) == (
        optuna.trial.TrialState.FAIL,
        optuna.trial.TrialState.WAITING,
    )
    assert (retry.params, retry.user_attrs["seed"]) == (failed.params, 7)
    assert (retry.system_attrs["failed_trial"], retry.system_attrs["retry_history"]) == (0, [0])


def test_a_journal_retry_queued_before_a_crash_is_not_queued_twice(tmp_path, monkeypatch):
    """The journal writes the retry, then the FAIL: a process that dies in between leaves the
    trial RUNNING with its retry queued; the sweep that fails it later adds no second retry."""
    from study.store import recovery

    url = f"journal:///{tmp_path}/s.log"
    study = optuna.create_study(study_name="s", storage=store.load(url))
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    with monkeypatch.context() as m:

        def crash(*args, **kwargs):
            raise KeyboardInterrupt  # the process dies here

        m.setattr(optuna.storages.JournalStorage, "set_trial_state_values", crash)
        with pytest.raises(KeyboardInterrupt):
            recovery.fail_and_retry(store.of(study._storage), study, trial.number, max_retries=1)
    later = optuna.load_study(study_name="s", storage=store.load(url))
    assert [t.state.name for t in later.trials] == ["RUNNING", "WAITING"]
    assert recovery.fail_and_retry(store.of(later._storage), later, trial.number, max_retries=1)
    assert [t.state.name for t in store.of(later._storage).optuna.get_all_trials(0)] == [
        "FAIL",
        "WAITING",
    ]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask() on a heartbeat's storage
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_optunas_own_stale_sweep_fails_and_retries_as_one_step(tmp_path, request, kind):
    """`fail_stale_trials` (what study.optimize and the RDB sweep run) on a store opened with
    the heartbeat: when the retry cannot be stored, the stale trial stays RUNNING; then it is
    failed with its retry. Before: Optuna stored the FAIL, then its callback's insert failed."""
    from study.store import url as url_mod

    url = f"sqlite:///{tmp_path}/s.db" if kind == "sqlite" else request.getfixturevalue("pg_url")
    beat = url_mod.Heartbeat(interval=1, grace_period=1, max_retries=1)
    db = store.open_store(store.check(url), beat)
    study = optuna.create_study(study_name="s", storage=db.optuna)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    db.optuna.record_heartbeat(trial._trial_id)
    time.sleep(2.2)  # silent past the grace period
    with pytest.MonkeyPatch.context() as m:
        _refuse_new_trials(kind, url, m)
        with pytest.raises(Exception, match="full"):
            db.silent(study, grace_period=1)
        on = "" if kind == "sqlite" else " ON trials"
        import sqlalchemy

        engine = sqlalchemy.create_engine(url)
        with engine.begin() as c:
            c.exec_driver_sql(f"DROP TRIGGER refuse_trials{on}")
        engine.dispose()
    assert [t.state.name for t in study.get_trials()] == ["RUNNING"]
    assert db.silent(study, grace_period=1) == [trial.number]
    assert [t.state.name for t in study.get_trials()] == ["FAIL", "WAITING"]
