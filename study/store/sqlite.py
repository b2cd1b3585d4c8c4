"""SQLite: one file, Optuna's RDBStorage, each check and its write one IMMEDIATE transaction."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import quote

import optuna
import sqlalchemy.exc
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from study.errors import StorageError
from study.store.base import causes, disk_full
from study.store.rdb import RDBStore, SweepingStorage
from study.store.url import StorageURL, check_writable_dir

SQLITE_BUSY_TIMEOUT_S = 60  # wait for a lock instead of failing with "database is locked"
# Any of Optuna's tables marks its database: a second process may look while the first is still
# creating the schema, and a half-made Optuna schema is not another program's database.
_OPTUNA_TABLES = {
    "studies",
    "trials",
    "alembic_version",
    "version_info",
    "study_directions",
    "trial_values",
}


class SqliteStore(RDBStore):
    kind = "sqlite"

    @classmethod
    def check(cls, parsed: StorageURL, read_only: bool = False) -> None:
        """A file that is missing (its folder writable), or Optuna's whole SQLite database."""
        path = parsed.path
        if path.is_dir():
            raise StorageError(
                f"storage path {str(path)!r} is a directory; point --storage at a .db file"
            )
        if not path.exists() or path.stat().st_size == 0:
            check_writable_dir(path)
            return
        with open(path, "rb") as f:
            header = f.read(16)
        if header != b"SQLite format 3\x00":
            raise StorageError(
                f"{str(path)!r} is not a SQLite database (corrupt or another kind of file); "
                "move it away or choose another --storage path"
            )
        try:
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                tables = {
                    r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")
                }
                # every page, read-only
                problems = [r[0] for r in con.execute("PRAGMA quick_check(1)")]
                if problems != ["ok"]:
                    raise sqlite3.DatabaseError(
                        " ".join(problems[0].replace("*** in database main ***", "").split())
                    )
            finally:
                con.close()
        except sqlite3.DatabaseError as e:
            raise StorageError(
                f"{str(path)!r} is a damaged SQLite database ({e}); restore it from a copy or "
                "choose another --storage path"
            ) from None
        if tables and not _OPTUNA_TABLES & tables:
            raise StorageError(
                f"{str(path)!r} is another program's SQLite database (no Optuna tables); "
                "choose another --storage path"
            )
        if read_only:
            return
        if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
            raise StorageError(
                f"{str(path)!r} is read-only; make it writable or copy it elsewhere", exit_code=1
            )

    @classmethod
    def _engine(cls, parsed: StorageURL, *, read_only: bool) -> tuple[str, dict]:
        url = parsed.url
        if read_only:
            url = f"sqlite:///file:{quote(str(parsed.path.resolve()))}?mode=ro&uri=true"
        else:
            parsed.path.parent.mkdir(parents=True, exist_ok=True)
        return url, {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}

    @classmethod
    def _storage_class(cls) -> type[RDBStorage]:
        return SQLiteStorage

    @classmethod
    @contextlib.contextmanager
    def _schema_lock(cls, parsed: StorageURL) -> Iterator[None]:
        """Serialise opening a SQLite file across processes: RDBStorage creates the schema on
        first open, and two processes doing it at once fail ("table ... already exists")."""
        with open(parsed.path.with_name(parsed.path.name + ".lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _after_open(self) -> None:
        _complete_indexes(self._rdb, self.url.path)

    def _lock_for_check(self, session) -> None:
        """FOR UPDATE is a no-op on SQLite and the driver opens a transaction only at the first
        write, so two engines both checked, found nothing, and both inserted one parameter set.
        SQLite's IMMEDIATE transactions run one at a time. Taken once per transaction (a step
        may check twice, as `fail_and_retry` does before its insert)."""
        connection = session.connection()
        if not connection.connection.dbapi_connection.in_transaction:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    def fault(self, exc: BaseException) -> str | None:
        """SQLite's SQLITE_FULL (a full disk, or a file at its size limit) names the file."""
        for e in causes(exc):
            if isinstance(e, sqlite3.Error) and getattr(e, "sqlite_errorcode", None) == 13:
                return disk_full(self.url.path if self.url else "the SQLite file")
        return super().fault(exc)

    def advice(self, workers: int) -> list[str]:
        # SQLite (with its busy timeout) holds many workers without "database is locked", but
        # a journal file is faster per trial from a few workers up (docs/results.md).
        if workers >= 4:
            return [
                f"note: {workers} workers on SQLite work, but --storage "
                f"journal:///storage/sinstudy.log is faster (README: Scale out)"
            ]
        return []


class SQLiteStorage(SweepingStorage):
    """Optuna's RDBStorage, whose state changes are one atomic step on SQLite too.

    Optuna reads a trial's state, then writes the new one: FOR UPDATE, which makes that safe on
    PostgreSQL, is a no-op on SQLite, whose driver opens a transaction only at the write. Two
    engines popping the queue at once both took one WAITING trial and trained it twice; a stale
    check could write FAIL over a trial that had just completed. Here the read and the write
    are one IMMEDIATE transaction, which SQLite runs one at a time."""

    def _set_state_once(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None
    ) -> bool:
        with _immediate(self):
            return super()._set_state_once(trial_id, state, values)


@contextlib.contextmanager
def _immediate(storage: RDBStorage) -> Iterator[None]:
    """The calls inside (one Optuna storage method) run in one SQLite IMMEDIATE transaction: it
    is begun on this thread's session, which Optuna's own session scope then uses, commits
    and closes."""
    session = storage.scoped_session()
    try:
        session.connection().exec_driver_sql("BEGIN IMMEDIATE")
    except sqlalchemy.exc.SQLAlchemyError as e:
        session.rollback()
        session.close()
        raise optuna.exceptions.StorageInternalError(f"could not lock the study: {e}") from e
    try:
        yield
    finally:
        session.close()  # closed already, unless the call raised before it used the session


def _complete_indexes(storage: RDBStorage, path: Path) -> None:
    """Create the indexes of Optuna's schema that a SQLite file lacks. SQLite runs each CREATE
    of Optuna's schema in a transaction of its own, so a process killed while it created a new
    file (between CREATE TABLE studies and its UNIQUE INDEX on the name) left tables without
    their indexes, which later opens never add: two runs could then each
    create a study of the same name. Called under the schema lock; cheap when all are there."""
    from optuna.storages._rdb import models

    for table in models.BaseModel.metadata.sorted_tables:
        for index in table.indexes:
            try:
                index.create(storage.engine, checkfirst=True)
            except sqlalchemy.exc.IntegrityError:
                column = ", ".join(c.name for c in index.columns)
                raise StorageError(
                    f"{str(path)!r} holds rows that should be unique ({table.name}.{column}: e.g. "
                    "two studies of one name, from a run killed while it created the file); "
                    "delete the extra ones (optuna delete-study) or choose another --storage path",
                    exit_code=1,
                ) from None
