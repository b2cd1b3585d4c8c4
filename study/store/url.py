"""Storage URLs: what a `--storage` value names, and how it is printed.

URL forms:
  sqlite:///relative/path.db  sqlite:////absolute/path.db   one file, busy timeout 60 s
  postgresql://user@host:port/db  (or postgresql+psycopg://)    a server, for several machines
  journal:///relative/path.log  journal:////absolute/path.log Optuna's journal file
The default, sqlite:///storage/sinstudy.db, is relative to the working directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from study.errors import StorageError


@dataclass(frozen=True)
class StorageURL:
    url: str
    kind: str  # sqlite | postgresql | journal
    path: Path | None  # the file for sqlite / journal

    def missing_file(self) -> Path | None:
        """The file this URL names when it is absent or empty (the first open creates it);
        None for a server or a file that holds something."""
        if self.path is None or (self.path.exists() and self.path.stat().st_size):
            return None
        return self.path


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


@dataclass(frozen=True)
class Heartbeat:
    """How a run keeps its trials alive, which every process of it opens its storage with:
    Optuna's heartbeat settings, and the seconds an outage of the storage is waited out
    (`outage`; 0: a failing step raises at once; study.store.outage)."""

    interval: int
    grace_period: int
    max_retries: int
    outage: float = 0.0


def check_writable_dir(path: Path) -> None:
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


SERVER_VIEWS = Path("storage")  # a server's studies: their views under the working directory


def beside(url: str, folder: str) -> str:
    """Where a study's views go unless told: the folder `folder` beside its SQLite or journal
    file, so every reader finds them from the storage URL alone; for a server (PostgreSQL),
    storage/<folder> under the working directory (machines sharing a study share that folder
    themselves)."""
    path = parse(url).path
    return str((path.parent if path is not None else SERVER_VIEWS) / folder)


def dashboard_target(url: str) -> str:
    """optuna-dashboard takes RDB URLs as they are and a journal file by its path."""
    return url[len("journal:///") :] if url.startswith("journal:///") else url
