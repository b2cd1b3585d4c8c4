"""Where a study is stored: one interface (`Store`) over SQLite, PostgreSQL and the journal file.

`check(url)` reads (never writes) whatever the URL points at and raises StorageError with one
line that names the fix: a corrupt file, another program's database, a folder that cannot be
written, an unreachable server. Only after it passes does `open_store()` let Optuna create its
tables. `of(storage)` is the Store of an Optuna storage opened elsewhere (a study's, a test's).
No module outside this package asks which backend a storage is.
"""

from __future__ import annotations

import optuna
from optuna.storages import JournalStorage, RDBStorage

from study.store.base import Store
from study.store.journal import JournalStore
from study.store.outage import Outage
from study.store.postgres import PostgresStore, Unreachable
from study.store.sqlite import SqliteStore
from study.store.url import Heartbeat, StorageURL, beside, parse, redact

KINDS: dict[str, type[Store]] = {
    "sqlite": SqliteStore,
    "postgresql": PostgresStore,
    "journal": JournalStore,
}

__all__ = [
    "Heartbeat",
    "Store",
    "StorageURL",
    "beside",
    "check",
    "of",
    "open_store",
    "parse",
    "redact",
]


def check(url: str, *, read_only: bool = False, outage: Outage | None = None) -> StorageURL:
    """Validate a storage URL without writing anything. Raises StorageError. `read_only`: for a
    reader, which needs no write access; `outage`: a run's rule, by which a database server
    that is down or restarting is waited for (study.store.outage)."""
    parsed = parse(url)
    kind = KINDS[parsed.kind]
    if outage is None:
        kind.check(parsed, read_only)
    else:
        outage.run(
            lambda again: kind.check(parsed, read_only),
            lambda e: str(e) if isinstance(e, Unreachable) else None,
        )
    return parsed


def open_store(
    parsed: StorageURL, heartbeat: Heartbeat | None = None, *, read_only: bool = False
) -> Store:
    """Open a checked URL (creating a SQLite or journal file and its folder on first use).
    `heartbeat`: Optuna's heartbeat settings (RDB storages; the journal's is always on);
    `read_only`: an existing storage opened so that nothing can be written."""
    return KINDS[parsed.kind].open(parsed, heartbeat, read_only=read_only)


def of(storage: optuna.storages.BaseStorage) -> Store:
    """The Store of an Optuna storage (a study's cache unwrapped)."""
    inner = getattr(storage, "_backend", None)
    if isinstance(inner, RDBStorage):
        storage = inner
    if isinstance(storage, JournalStorage):
        return JournalStore(storage)
    if getattr(storage, "store", None) is not None:  # opened here: the store that opened it
        return storage.store
    if isinstance(storage, RDBStorage):
        dialect = storage.engine.dialect.name
        return (PostgresStore if dialect == "postgresql" else SqliteStore)(storage)
    return Store(storage)


def load(url: str) -> optuna.storages.BaseStorage:
    """The Optuna storage of a URL, checked and opened with no heartbeat (scripts, tests)."""
    return open_store(check(url)).optuna
