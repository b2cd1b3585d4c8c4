"""Storage URLs: check them before anything is written, then open them as Optuna storages.

URL forms:
  sqlite:///relative/path.db  sqlite:////absolute/path.db   RDBStorage, busy timeout 60 s
  postgresql://user@host:port/db  (or postgresql+psycopg://)    RDBStorage, for several machines
  journal:///relative/path.log  journal:////absolute/path.log JournalStorage on a file
The default, sqlite:///storage/sinstudy.db, is relative to the working directory.

`check()` reads (never writes) whatever the URL points at and raises StorageError with one line
that names the fix: a corrupt file, another program's database, a directory we cannot write, an
unreachable server. Only after it passes does `open_storage()` let Optuna create its tables.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shlex
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import optuna
import sqlalchemy.exc
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.storages.journal._storage import (
    JournalOperation,
)  # private: see TolerantJournalBackend
from optuna.trial import TrialState

from study.errors import StorageError
from study.quiet import experimental
from study.store.recovery import StaleRetry

SQLITE_BUSY_TIMEOUT_S = 60  # wait for a lock instead of failing with "database is locked"
PG_CONNECT_TIMEOUT_S = 5  # an unreachable server is reported after this, not a hang
SCHEMA_RACE_TRIES = 3  # opens of a storage whose schema someone else is creating at that moment
JOURNAL_LOCK_GRACE_S = 10  # a journal lock older than this is broken (its holder died mid-append)
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


@dataclass(frozen=True)
class StorageURL:
    url: str
    kind: str  # sqlite | postgresql | journal
    path: Path | None  # the file for sqlite / journal


def redact(url: str) -> str:
    """The URL with its password (if any) replaced by ***: what is stored, printed and served."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL at all: nothing in it is a password we could find
        return url
    if not password:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def parse(url: str) -> StorageURL:
    scheme = urlsplit(url).scheme.lower()
    shown = redact(url)
    if scheme == "sqlite":
        rest = url[len("sqlite:///") :] if url.lower().startswith("sqlite:///") else None
        if not rest or rest == ":memory:":
            raise StorageError(
                f"storage URL {shown!r} names no file; use sqlite:///path/to/study.db"
            )
        # SQLAlchemy wants the scheme in lower case
        return StorageURL("sqlite:///" + rest, "sqlite", Path(rest))
    if scheme == "journal":
        rest = url[len("journal:///") :] if url.lower().startswith("journal:///") else None
        if not rest:
            raise StorageError(
                f"storage URL {shown!r} names no file; use journal:///path/to/study.log"
            )
        return StorageURL(url, "journal", Path(rest))
    if scheme in ("postgresql", "postgresql+psycopg", "postgres"):
        if not urlsplit(url).path.strip("/"):
            raise StorageError(
                f"storage URL {shown!r} names no database; use postgresql://user@host:5432/dbname"
            )
        fixed = "postgresql+psycopg://" + url.split("://", 1)[1]  # SQLAlchemy: use psycopg 3
        return StorageURL(fixed, "postgresql", None)
    raise StorageError(
        f"unsupported storage URL {shown!r}; use sqlite:///path.db, journal:///path.log "
        "or postgresql://user@host:5432/db"
    )


def _check_writable_dir(path: Path) -> None:
    """The file's folder must exist or be creatable, and be writable."""
    folder = path.parent if str(path.parent) else Path(".")
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise StorageError(
            f"cannot write to {str(folder)!r} for storage file {str(path)!r}; "
            "choose a writable folder with --storage",
            exit_code=1,
        )


def _check_sqlite(path: Path, read_only: bool = False) -> None:
    if path.is_dir():
        raise StorageError(
            f"storage path {str(path)!r} is a directory; point --storage at a .db file"
        )
    if not path.exists() or path.stat().st_size == 0:
        _check_writable_dir(path)
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
            f"{str(path)!r} is a damaged SQLite database ({e}); restore it from a copy or choose "
            f"another --storage path"
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


def _check_journal(path: Path, read_only: bool = False) -> None:
    if path.is_dir():
        raise StorageError(
            f"storage path {str(path)!r} is a directory; point --storage at a .log file"
        )
    if not path.exists() or path.stat().st_size == 0:
        _check_writable_dir(path)
        return
    with open(path, "rb") as f:
        first = f.readline()
    try:
        ok = "op_code" in json.loads(first)
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise StorageError(
            f"{str(path)!r} is not an Optuna journal file; move it away or choose another "
            f"--storage path"
        )
    if not read_only and not os.access(path, os.W_OK):
        raise StorageError(
            f"{str(path)!r} is read-only; make it writable or copy it elsewhere", exit_code=1
        )


def _check_postgresql(url: str) -> None:
    try:
        import psycopg
    except ImportError:
        raise StorageError(
            "PostgreSQL storage needs psycopg; run: pip install 'sinstudy[postgres]'", exit_code=1
        ) from None
    dsn = url.replace("postgresql+psycopg://", "postgresql://", 1)
    try:
        psycopg.connect(dsn, connect_timeout=PG_CONNECT_TIMEOUT_S).close()
    except psycopg.Error as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StorageError(
            f"cannot connect to PostgreSQL at {redact(dsn)!r} ({first}); start the server, create "
            f"the "
            "database, or fix --storage",
            exit_code=1,
        ) from None


def repair_journal(path: Path) -> str | None:
    """A journal whose last record was cut (a crash or a full disk mid-append) would get the next
    record glued onto the partial one, and from then on no reader could parse the file. Keep a
    byte-exact copy beside it, cut the partial record off (under Optuna's journal lock, so no
    writer appends meanwhile) and return one line saying so; None when the file is whole."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    lock = JournalFileSymlinkLock(str(path.resolve()), grace_period=JOURNAL_LOCK_GRACE_S)
    lock.acquire()
    try:
        data = path.read_bytes()
        if data.endswith(b"\n"):
            return None
        keep = data.rfind(b"\n") + 1
        backup = path.with_name(f"{path.name}.partial-{len(data)}.bak")
        backup.write_bytes(data)
        with open(path, "r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())
    finally:
        lock.release()
    return (
        f"note: the last record of {str(path)!r} was cut off (a crash or a full disk while "
        f"writing); "
        f"removed its {len(data) - keep} bytes, the file as it was is kept at {str(backup)!r}"
    )


def check(url: str, *, read_only: bool = False) -> StorageURL:
    """Validate a storage URL without writing anything. Raises StorageError. `read_only`: for a
    reader, which needs no write access."""
    parsed = parse(url)
    if parsed.kind == "sqlite":
        _check_sqlite(parsed.path, read_only)
    elif parsed.kind == "journal":
        _check_journal(parsed.path, read_only)
    else:
        _check_postgresql(parsed.url)
    return parsed


@dataclass(frozen=True)
class Heartbeat:
    interval: int
    grace_period: int
    max_retries: int


def open_storage(
    parsed: StorageURL, heartbeat: Heartbeat | None = None, *, read_only: bool = False
) -> optuna.storages.BaseStorage:
    """Open a checked URL. Creates the SQLite/journal file (and its folder) on first use.

    With `heartbeat`, RDB storages run Optuna's heartbeat and retry stale trials; the journal has
    no heartbeat in Optuna, see study.store.recovery for its equivalent. `read_only`: an existing
    storage, opened so that nothing can be written (SQLite's mode=ro, a PostgreSQL session whose
    transactions are read-only; the journal is only read unless something appends), so readers
    work on a file or database they may not write.
    """
    if read_only and parsed.kind != "journal":  # a journal is opened alike: readers only read
        return _open_read_only(parsed)
    if parsed.path is not None and not read_only:
        parsed.path.parent.mkdir(parents=True, exist_ok=True)
    if parsed.kind == "journal":
        # An absolute path: Optuna's lock is a symlink to the journal, and with a relative
        # target the link dangles, so a lock left by a killed process is never broken (every
        # later run hangs). Held for one append at a time, a lock this old has a dead holder.
        path = str(parsed.path.resolve())
        storage = JournalStorage(TolerantJournalBackend(path, lock_obj=ReentrantJournalLock(path)))
        # Reentrant, and taken before the file lock by journal_lock: a thread of this process
        # (the writer's heartbeat) holds Optuna's lock while it waits for the file's, so a hold
        # of the file that then needed Optuna's lock waited on it until the grace period broke
        # the file lock (chaos.py: "did not possess lock").
        storage._thread_lock = threading.RLock()
        return storage
    url, kwargs = _engine(parsed, read_only=False)
    hb = {}
    if heartbeat is not None:
        hb = dict(
            heartbeat_interval=heartbeat.interval,
            grace_period=heartbeat.grace_period,
            heartbeat_stale_trial_callback=StaleRetry(heartbeat.max_retries),
        )
    try:
        for attempt in range(SCHEMA_RACE_TRIES):
            try:
                with experimental(), _schema_lock(parsed):  # heartbeat: experimental in Optuna 5
                    kind = SQLiteStorage if parsed.kind == "sqlite" else RDBStorage
                    storage = kind(url, engine_kwargs=kwargs, **hb)
                    if parsed.kind == "sqlite":
                        _complete_indexes(storage, parsed.path)
                    return storage
            except sqlalchemy.exc.DBAPIError as e:
                # Another program (plain Optuna, the dashboard, a run on another machine) created
                # the schema while this one did: it exists now, so open it again.
                if attempt + 1 == SCHEMA_RACE_TRIES or not _schema_race(e):
                    raise
                time.sleep(0.1 + random.random() * 0.4)
        raise AssertionError("unreachable")
    except RuntimeError as e:  # e.g. a schema from another Optuna version
        raise StorageError(
            f"{redact(parsed.url)}: {str(e).splitlines()[0]}", exit_code=1
        ) from None


class SQLiteStorage(RDBStorage):
    """Optuna's RDBStorage, whose state changes are one atomic step on SQLite too.

    Optuna reads a trial's state, then writes the new one: FOR UPDATE, which makes that safe on
    PostgreSQL, is a no-op on SQLite, whose driver opens a transaction only at the write. Two
    engines popping the queue at once both took one WAITING trial and trained it twice; a stale
    check could write FAIL over a trial that had just completed. Here the read and the write
    are one IMMEDIATE transaction, which SQLite runs one at a time."""

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        with _immediate(self):
            return super().set_trial_state_values(trial_id, state, values)


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


def _engine(parsed: StorageURL, *, read_only: bool) -> tuple[str, dict]:
    """The SQLAlchemy URL and engine options of an RDB storage; `read_only`: connections that
    cannot write (SQLite's mode=ro, PostgreSQL sessions whose transactions are read-only)."""
    if parsed.kind == "sqlite":
        url = parsed.url
        if read_only:
            url = f"sqlite:///file:{quote(str(parsed.path.resolve()))}?mode=ro&uri=true"
        return url, {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    connect: dict = {"connect_timeout": PG_CONNECT_TIMEOUT_S}
    if read_only:
        connect["options"] = "-c default_transaction_read_only=on"
    return parsed.url, {"pool_pre_ping": True, "connect_args": connect}


def _open_read_only(parsed: StorageURL) -> optuna.storages.BaseStorage:
    """An RDB storage whose connections cannot write."""
    url, kwargs = _engine(parsed, read_only=True)
    try:
        with experimental():
            return RDBStorage(url, engine_kwargs=kwargs)
    except (RuntimeError, sqlalchemy.exc.DBAPIError) as e:  # another Optuna version's schema
        raise StorageError(
            f"{redact(parsed.url)}: {str(e).strip().splitlines()[0]}", exit_code=1
        ) from None


class ReentrantJournalLock(JournalFileSymlinkLock):
    """Optuna's journal file lock, which the thread holding it may take again: a check of the
    file and the append it guards (sinstudy.batched.bulk) run under one hold, and the append's
    own acquire (Optuna's append_logs) nests inside it."""

    def __init__(self, path: str):
        super().__init__(path, grace_period=JOURNAL_LOCK_GRACE_S)
        self._owner: int | None = None
        self._depth = 0

    def acquire(self) -> bool:
        if self._depth and self._owner == threading.get_ident():
            self._depth += 1
            return True
        got = super().acquire()
        self._owner, self._depth = threading.get_ident(), 1
        return got

    def release(self) -> None:
        if not self._depth or self._owner != threading.get_ident():
            # the base class breaking a dead holder's lock from inside acquire()
            super().release()
            return
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
            super().release()


@contextlib.contextmanager
def journal_lock(storage: JournalStorage) -> Iterator[None]:
    """Hold the journal file's lock (a storage opened here) across several calls."""
    lock = storage._backend._lock
    if not isinstance(lock, ReentrantJournalLock):
        raise TypeError("journal storage not opened by sinstudy.storage.open_storage")
    with storage._thread_lock:  # Optuna's, then the file's: the order its own calls take them
        lock.acquire()
        try:
            yield
        finally:
            lock.release()


class TolerantJournalBackend(JournalFileBackend):
    """Optuna's journal file reader, which raises JSONDecodeError on a whole line that is not a
    record (a stray write, an editor's save) and so stops every command on the file. Here such
    a line reads as a record that changes nothing (Optuna's DISCARD_TRIALS, which its replay
    skips), so the line count that readers resume from stays right; `bad_lines` names them (1 =
    the first line). A last line without its newline is an append in progress, as in Optuna."""

    def __init__(self, path: str, lock_obj: JournalFileSymlinkLock):
        super().__init__(path, lock_obj=lock_obj)
        self.bad_lines: set[int] = set()

    def read_logs(self, log_number_from: int) -> Iterator[dict]:
        with open(self._file_path, "rb") as f:
            remaining = os.stat(self._file_path).st_size
            start = 0
            if log_number_from in self._log_number_offset:
                f.seek(self._log_number_offset[log_number_from])
                start = log_number_from
                remaining -= self._log_number_offset[log_number_from]
            for number, line in enumerate(f, start=start):
                remaining -= len(line)
                if remaining < 0 or not line.endswith(b"\n"):
                    break  # appended after the size was read, or being written now
                self._log_number_offset.setdefault(
                    number + 1, self._log_number_offset[number] + len(line)
                )
                if number < log_number_from:
                    continue
                yield _record(line) or self._bad(number + 1)

    def _bad(self, line_number: int) -> dict:
        self.bad_lines.add(line_number)
        return {"op_code": JournalOperation.DISCARD_TRIALS}


def _record(line: bytes) -> dict | None:
    try:
        log = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(log, dict) and isinstance(log.get("op_code"), int)
    return log if ok and log["op_code"] in _JOURNAL_OPS else None


_JOURNAL_OPS = {int(op) for op in JournalOperation}


def journal_notes(storage: optuna.storages.BaseStorage, path: Path) -> list[str]:
    """One line per line of the journal that is not a record (after the storage has read it)."""
    backend = getattr(storage, "_backend", None)
    bad = sorted(getattr(backend, "bad_lines", ()))
    return [
        f"note: line {n} of {str(path)!r} is not an Optuna journal record; it is skipped "
        f"(remove it when no run uses the file: sed -i '{n}d' {shlex.quote(str(path))})"
        for n in bad
    ]


def _complete_indexes(storage: RDBStorage, path: Path) -> None:
    """Create the indexes of Optuna's schema that a SQLite file lacks. SQLite runs each CREATE
    of Optuna's schema in a transaction of its own, so a process killed while it created a new
    file (between CREATE TABLE studies and its UNIQUE INDEX on the name: the chaos harness found
    it) left tables without their indexes, which later opens never add: two runs could then each
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


def _schema_race(e: Exception) -> bool:
    text = str(e).lower()
    return "already exists" in text or "duplicate key" in text


@contextlib.contextmanager
def _schema_lock(parsed: StorageURL) -> Iterator[None]:
    """Serialise opening a SQLite file across processes: RDBStorage creates the schema on first
    open, and two processes doing it at once fail ("table ... already exists")."""
    if parsed.kind != "sqlite":
        yield
        return
    with open(parsed.path.with_name(parsed.path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load(url: str) -> optuna.storages.BaseStorage:
    return open_storage(check(url))
