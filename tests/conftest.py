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
        [sys.executable, "-m", "study", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
