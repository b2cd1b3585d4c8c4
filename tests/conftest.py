"""Shared helpers: a tiny study config (seconds on a CPU) and the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# A tiny problem so an end-to-end study runs in seconds: small sets, narrow space, few epochs.
TINY_TOML = """
[data]
n_train = 128
n_val = 64
n_test = 256

[train]
batch_size = 32

[search_space]
depth = [1, 2]
width = [4, 16]
lr = [1e-3, 3e-2]
activation = ["tanh", "relu", "identity"]
"""


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty folder as the working directory, with the tiny config in it."""
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m study ARGS` as a user would, in `cwd`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("SINSTUDY_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "study", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


PG_URL = os.environ.get("SINSTUDY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def pg_url():
    """A throw-away PostgreSQL database on $SINSTUDY_TEST_PG's server, dropped afterwards."""
    import uuid

    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        pytest.skip(
            f"PostgreSQL unreachable at {PG_URL} ({str(e).strip().splitlines()[0]}); set "
            f"SINSTUDY_TEST_PG"
        )
    name = f"sinstudy_test_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def start_cli(*args: str, cwd: Path) -> subprocess.Popen:
    """Start `python -m study ARGS` in its own session (so a test can signal its process group)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "study", *args],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def spawned_children(pid: int) -> list[int]:
    """Processes that `pid` started through multiprocessing's spawn (Linux /proc): the
    standard engine's workers, the batched engine's writer."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid and b"spawn_main" in cmd:
                kids.append(int(entry.name))
    return kids
