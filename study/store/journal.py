"""The journal file: Optuna's JournalStorage on one file, with a heartbeat of its own.

Optuna's journal has no heartbeat; a running trial here carries its last beat as the system
attr HEARTBEAT_ATTR and the stale-trial sweep reads it (study.store.recovery). Every check and
the write after it run under one hold of the file's lock (`_locked`), which the thread holding
it may take again, so the check reads the file itself, not only what the last sync saw.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.storages.journal._storage import (
    JournalOperation,
)  # private: see TolerantJournalBackend

from study.errors import StorageError
from study.store.base import HEARTBEAT_ATTR, Store
from study.store.url import StorageURL, check_writable_dir

JOURNAL_LOCK_GRACE_S = 10  # a journal lock older than this is broken (its holder died mid-append)


class JournalStore(Store):
    kind = "journal"

    @classmethod
    def check(cls, parsed: StorageURL, read_only: bool = False) -> None:
        path = parsed.path
        if path.is_dir():
            raise StorageError(
                f"storage path {str(path)!r} is a directory; point --storage at a .log file"
            )
        if not path.exists() or path.stat().st_size == 0:
            check_writable_dir(path)
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

    @classmethod
    def open(cls, parsed: StorageURL, heartbeat=None, *, read_only: bool = False) -> JournalStore:
        """Open (and create) the file. Readers open it alike: they only read. `heartbeat`: the
        journal's is ours (HEARTBEAT_ATTR), the same whatever the settings."""
        if not read_only:
            parsed.path.parent.mkdir(parents=True, exist_ok=True)
        # An absolute path: Optuna's lock is a symlink to the journal, and with a relative
        # target the link dangles, so a lock left by a killed process is never broken (every
        # later run hangs). Held for one append at a time, a lock this old has a dead holder.
        path = str(parsed.path.resolve())
        storage = JournalStorage(TolerantJournalBackend(path, lock_obj=ReentrantJournalLock(path)))
        # Reentrant, and taken before the file lock by `_locked`: a thread of this process
        # (the writer's heartbeat) holds Optuna's lock while it waits for the file's, so a hold
        # of the file that then needed Optuna's lock waited on it until the grace period broke
        # the file lock.
        storage._thread_lock = threading.RLock()
        return cls(storage, parsed, heartbeat, read_only=read_only)

    def opening_notes(self) -> list[str]:
        note = repair(self.url.path)
        return ([note] if note else []) + self.reading_notes()

    def reading_notes(self) -> list[str]:
        """One line per line of the journal that is not a record (after it has been read)."""
        path = self.url.path
        bad = sorted(getattr(self.optuna._backend, "bad_lines", ()))
        return [
            f"note: line {n} of {str(path)!r} is not an Optuna journal record; it is skipped "
            f"(remove it when no run uses the file: sed -i '{n}d' {shlex.quote(str(path))})"
            for n in bad
        ]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the journal file's lock across several calls."""
        lock = self.optuna._backend._lock
        if not isinstance(lock, ReentrantJournalLock):
            raise TypeError("journal storage not opened by study.store")
        with self.optuna._thread_lock:  # Optuna's, then the file's: the order its calls take
            lock.acquire()
            try:
                yield
            finally:
                lock.release()

    def heartbeat_attrs(self) -> dict[str, Any]:
        return {HEARTBEAT_ATTR: time.time()}

    @contextlib.contextmanager
    def beating(self, trial_id: int, interval: float) -> Iterator[None]:
        stop = threading.Event()

        def beat() -> None:
            while True:
                try:
                    self.optuna.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
                except optuna.exceptions.UpdateFinishedTrialError:
                    return
                if stop.wait(interval):
                    return

        thread = threading.Thread(target=beat, daemon=True, name="sinstudy-heartbeat")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


def repair(path: Path) -> str | None:
    """A journal whose last record was cut (a crash or a full disk mid-append) would get the next
    record glued onto the partial one, and from then on no reader could parse the file. Keep a
    byte-exact copy beside it, cut the partial record off (under Optuna's journal lock, so no
    writer appends meanwhile) and return one line saying so; None when the file is whole. A copy
    that cannot be written raises, leaving neither the copy nor a change to the file."""
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
        try:
            backup.write_bytes(data)
        except OSError:  # a full disk: no half copy is left, the file stays as it is
            backup.unlink(missing_ok=True)
            raise
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


class ReentrantJournalLock(JournalFileSymlinkLock):
    """Optuna's journal file lock, which the thread holding it may take again: a check of the
    file and the append it guards (study.store.journal) run under one hold, and the append's
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

    def append_logs(self, logs: list[dict]) -> None:
        """Optuna's append, with the file named in a failed write's error (the OSError of a
        write or close carries no file name, and a full disk then names nothing)."""
        try:
            super().append_logs(logs)
        except OSError as e:
            if e.filename is None:
                e.filename = self._file_path
            raise

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
