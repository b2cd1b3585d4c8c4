from __future__ import annotations

import re
import sqlite3

import optuna
import pytest

from study import storage
from study.storage import StorageError


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
        storage.check(url)


def test_new_sqlite_file_is_created_on_open_not_on_check(tmp_path):
    url = f"sqlite:///{tmp_path}/sub/dir/s.db"
    parsed = storage.check(url)
    assert not (tmp_path / "sub").exists()  # check() writes nothing
    optuna.create_study(storage=storage.open_storage(parsed), study_name="x")
    assert (tmp_path / "sub/dir/s.db").exists()


def test_corrupt_sqlite_file(tmp_path):
    f = tmp_path / "s.db"
    f.write_bytes(b"this is not a database" * 10)
    with pytest.raises(StorageError, match="not a SQLite database"):
        storage.check(f"sqlite:///{f}")


def test_foreign_sqlite_database(tmp_path):
    f = tmp_path / "other.db"
    con = sqlite3.connect(f)
    con.execute("CREATE TABLE customers (id INTEGER, name TEXT)")
    con.commit()
    con.close()
    with pytest.raises(StorageError, match="another program's SQLite database"):
        storage.check(f"sqlite:///{f}")


def test_path_below_a_file_cannot_be_written(tmp_path):
    # The unwritable case that holds for root as well (CI runs as root, which ignores modes).
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StorageError, match="cannot write") as e:
        storage.check(f"sqlite:///{tmp_path}/afile/s.db")
    assert e.value.exit_code == 1


def test_journal_file_round_trip_and_foreign_file(tmp_path):
    url = f"journal:///{tmp_path}/j.log"
    study = optuna.create_study(storage=storage.load(url), study_name="j")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert len(optuna.load_study(study_name="j", storage=storage.load(url)).trials) == 2
    (tmp_path / "notes.log").write_text("hello\n")
    with pytest.raises(StorageError, match="not an Optuna journal"):
        storage.check(f"journal:///{tmp_path}/notes.log")


def test_unreachable_postgresql_is_reported_quickly():
    # Port 9 (discard) on loopback has no PostgreSQL: refused at once, exit code 1 (environment).
    with pytest.raises(StorageError, match="cannot connect to PostgreSQL") as e:
        storage.check("postgresql://postgres@127.0.0.1:9/test")
    assert e.value.exit_code == 1


def test_a_journal_lock_left_by_a_killed_process_is_broken(tmp_path, monkeypatch):
    """A process killed mid-append leaves Optuna's journal lock behind; the next run must break
    it after the lock's grace period instead of waiting forever (a relative journal path made
    the lock a dangling symlink that was never broken)."""
    import time

    monkeypatch.chdir(tmp_path)
    first = storage.open_storage(storage.parse("journal:///storage/s.log"))
    optuna.create_study(storage=first, study_name="a")
    first._backend._lock.acquire()  # taken and never released: its holder "died"
    t0 = time.monotonic()
    optuna.create_study(
        storage=storage.open_storage(storage.parse("journal:///storage/s.log")), study_name="b"
    )
    assert time.monotonic() - t0 < storage.JOURNAL_LOCK_GRACE_S + 10


def test_a_schema_another_program_creates_meanwhile_is_opened_on_the_next_try(
    tmp_path, monkeypatch
):
    """Plain Optuna (or the dashboard, or a run on another machine) creating the schema while a
    run does made the run fail with "table studies already exists"; other errors still fail."""
    import sqlalchemy.exc

    url = f"sqlite:///{tmp_path}/s.db"
    real, calls = storage.RDBStorage, []

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

    monkeypatch.setattr(storage, "RDBStorage", racing)
    optuna.create_study(storage=storage.open_storage(storage.check(url)), study_name="x")
    assert len(calls) == 2

    def broken(*args, **kwargs):
        calls.append(1)
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, sqlite3.OperationalError("disk I/O"))

    monkeypatch.setattr(storage, "RDBStorage", broken)
    with pytest.raises(sqlalchemy.exc.OperationalError, match="disk I/O"):
        storage.open_storage(storage.check(url))
    assert len(calls) == 3


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_read_only_storage_reads_studies_and_cannot_write(tmp_path, request, kind):
    """What readers (best, plot, report) open: the study is there, and a write is refused by
    the database itself (SQLite's mode=ro, PostgreSQL's read-only transactions)."""
    url = f"sqlite:///{tmp_path}/s.db" if kind == "sqlite" else request.getfixturevalue("pg_url")
    study = optuna.create_study(study_name="s", storage=storage.load(url))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    ro = storage.open_storage(storage.check(url, read_only=True), read_only=True)
    assert [t.value for t in optuna.load_study(study_name="s", storage=ro).trials] == [
        t.value for t in study.trials
    ]
    with pytest.raises(Exception) as refused:  # Optuna wraps the database's error
        ro.create_new_study([optuna.study.StudyDirection.MINIMIZE], "other")
    e = refused.value
    assert re.search("read.?only", f"{e} {e.__cause__} {e.__context__}", re.I), repr(e)
    assert optuna.get_all_study_names(storage.load(url)) == ["s"]


def test_a_sqlite_file_left_without_its_indexes_gets_them_back(tmp_path):
    """A run killed while it created a new SQLite file, between Optuna's CREATE TABLE studies
    and its unique index on the name (each CREATE commits alone in SQLite): the next open adds
    the index, so two runs cannot each create a study of one name; a file that already holds
    two is refused with one line."""
    import sqlite3

    url = f"sqlite:///{tmp_path}/s.db"
    storage.load(url).engine.dispose()
    con = sqlite3.connect(tmp_path / "s.db")
    con.execute("DROP INDEX ix_studies_study_name")
    con.commit()
    con.close()
    opened = storage.load(url)
    optuna.create_study(study_name="s", storage=opened)
    with pytest.raises(optuna.exceptions.DuplicatedStudyError):
        optuna.create_study(study_name="s", storage=storage.load(url))
    # a file that already holds two studies of one name
    con = sqlite3.connect(tmp_path / "s.db")
    con.execute("DROP INDEX ix_studies_study_name")
    con.execute("INSERT INTO studies (study_name) VALUES ('s')")
    con.commit()
    con.close()
    with pytest.raises(StorageError, match="should be unique.*optuna delete-study"):
        storage.load(url)
