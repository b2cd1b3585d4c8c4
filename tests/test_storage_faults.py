"""The storage's environment failing under a run, for real: a full disk (a small tmpfs this test
mounts; CI runs as root) and a PostgreSQL server this test starts on a spare port and stops.
What is checked: the run ends with one line naming the cause and its fix, never Optuna's "invalid
data in the commit", and no traceback."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
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
        free = shutil.disk_usage(where).free
        (where / "filler").write_bytes(b"\0" * (free - FREE_KB * 1024))
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        where.rmdir()


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_full_disk_under_the_storage_is_named_with_its_file(workdir, full_disk, kind):
    """Before: SQLite ended with Optuna's "An exception is raised during the commit. This
    typically happens due to invalid data in the commit", the journal with "OSError: [Errno
    28] No space left on device" naming no file."""
    path = full_disk / ("s.db" if kind == "sqlite" else "s.log")
    url = f"sqlite:///{path}" if kind == "sqlite" else f"journal:///{path}"
    args = ["--config", "tiny.toml", "--no-progress", "--max-epochs", "40", "--n-trials", "2000"]
    r = run_cli("run", "--storage", url, *args, cwd=workdir)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1, r.stderr
    # from the run, or from its storage writer ("sinstudy: error: storage writer: disk ...")
    assert last.startswith("sinstudy: error: "), r.stderr
    assert f"disk full: cannot write {path};" in last, r.stderr
    assert "--storage" in last and "invalid data" not in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------ a PostgreSQL of its own


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name)]
    if not found[-1]:
        pytest.skip(f"a PostgreSQL server of the test's own needs {name} (apt install postgresql)")
    return found[-1]


def _as_postgres(*cmd: str) -> subprocess.CompletedProcess:
    as_postgres = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(as_postgres, capture_output=True, text=True)


@pytest.fixture
def own_pg() -> Iterator[tuple[str, str]]:
    """A PostgreSQL server started for this test on a spare port, with a database `t`:
    (its URL, its data folder). Stopped and removed afterwards."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    data = tempfile.mkdtemp(prefix="sinstudy-pg-")
    shutil.chown(data, "postgres", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    made = _as_postgres(initdb, "-D", data, "-A", "trust", "-U", "postgres")
    assert made.returncode == 0, made.stderr
    opts = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off"
    started = _as_postgres(pg_ctl, "-D", data, "-o", opts, "-w", "-l", f"{data}/log", "start")
    assert started.returncode == 0, started.stderr
    try:
        import psycopg

        url = f"postgresql://postgres@127.0.0.1:{port}"
        with psycopg.connect(f"{url}/postgres", autocommit=True) as admin:
            admin.execute("CREATE DATABASE t")
        yield f"{url}/t", data
    finally:
        _as_postgres(pg_ctl, "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.parametrize("engine", ["batched", "standard"])
def test_a_postgresql_server_lost_under_a_run_is_named_with_its_host(workdir, own_pg, engine):
    """The server stops while a run trains. Before: exit 1 with "StorageInternalError: An
    exception is raised during the commit. This typically happens due to invalid data in the
    commit, e.g. exceeding max length" (batched), or an UnboundLocalError from inside Optuna's
    trial loop (standard)."""
    url, data = own_pg
    proc = start_cli(
        "run", "--config", "tiny.toml", "--no-progress", "--storage", url, "--engine", engine,
        "--max-epochs", "4000", "--n-trials", "4", cwd=workdir,
    )  # fmt: skip
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            try:
                study = optuna.load_study(study_name="sinstudy", storage=store.load(url))
                if study.get_trials(states=(TrialState.RUNNING,)):
                    break
            except Exception:  # the study is still being created
                pass
            time.sleep(0.2)
        _as_postgres(_pg_bin("pg_ctl"), "-D", data, "-m", "fast", "-w", "stop")
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    port = url.rsplit(":", 1)[1].split("/")[0]
    assert proc.returncode == 1, err
    assert f"the PostgreSQL server at 127.0.0.1:{port} cannot be reached (" in err, err
    assert "invalid data" not in err and "Traceback" not in err, err
