"""Which PyTorch build the set-up installs (scripts/install_torch.sh, with its probes faked), and
the batched engine's check of the private kernels it calls."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from study.run.batched import kernels

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install_torch.sh"

# A stand-in for the environment's python: `-c` answers the "which torch" probe from a state
# file, `-m pip install` logs its arguments and installs the build its index gives (the CPU index
# gives the CPU build, the default index the CUDA build, as on a user's Linux machine), failing
# for an index named in $FAKE_DEAD_INDEX.
FAKE_PYTHON = r"""#!/usr/bin/env bash
state="$FAKE_DIR/torch"
if [ "$1" = -c ]; then
  [ -s "$state" ] || exit 1
  cat "$state"
  exit 0
fi
shift 2  # -m pip
echo "$*" >>"$FAKE_DIR/pip.log"
case "$1" in
  uninstall) rm -f "$state"; exit 0 ;;
esac
if [[ "$*" == *--index-url* ]]; then
  [[ -n "${FAKE_DEAD_INDEX:-}" && "$*" == *"$FAKE_DEAD_INDEX"* ]] && exit 1
  echo "cpu 2.13.0+cpu" >"$state"
else
  echo "cuda 2.13.0+cu130" >"$state"
fi
"""


def _setup(tmp_path: Path, *, gpu: bool, installed: str | None = None, **env: str):
    fake = tmp_path / "bin"
    fake.mkdir()
    py = fake / "python"
    py.write_text(FAKE_PYTHON)
    py.chmod(0o755)
    if gpu:
        smi = fake / "nvidia-smi"
        smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\n")
        smi.chmod(0o755)
    if installed:
        (tmp_path / "torch").write_text(installed + "\n")
    proc = subprocess.run(
        ["bash", str(SCRIPT)],
        env={
            # no real nvidia-smi or python on the path: only the fakes and the shell's tools
            "PATH": f"{fake}:/usr/bin:/bin",
            "PYTHON": str(py),
            "FAKE_DIR": str(tmp_path),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    log = tmp_path / "pip.log"
    calls = log.read_text().splitlines() if log.exists() else []
    return proc, calls


def test_no_gpu_installs_the_cpu_build_from_pytorchs_cpu_index(tmp_path):
    proc, calls = _setup(tmp_path, gpu=False)
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 1
    assert "--index-url https://download.pytorch.org/whl/cpu" in calls[0]
    assert "torch==2.13.0" in calls[0] and "--timeout" in calls[0]
    assert proc.stdout.strip() == "torch: installed 2.13.0+cpu (cpu build)"


def test_unreachable_cpu_index_falls_back_to_the_default_index_with_a_notice(tmp_path):
    proc, calls = _setup(tmp_path, gpu=False, FAKE_DEAD_INDEX="download.pytorch.org")
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 2 and "--index-url" not in calls[1] and "torch==2.13.0" in calls[1]
    assert "was not reachable" in proc.stderr and "default index" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stdout.strip() == "torch: installed 2.13.0+cu130 (cuda build)"


def test_a_gpu_gets_the_cuda_build_from_the_default_index(tmp_path):
    proc, calls = _setup(tmp_path, gpu=True, SINSTUDY_TORCH="2.11.0")
    assert proc.returncode == 0, proc.stderr
    assert calls == ["install -q torch==2.11.0"]
    assert "cuda build" in proc.stdout


def test_an_installed_torch_is_kept_whatever_the_machine(tmp_path):
    for gpu, build in ((True, "cpu 2.13.0+cpu"), (False, "cuda 2.11.0+cu130")):
        run = tmp_path / str(gpu)
        run.mkdir()
        proc, calls = _setup(run, gpu=gpu, installed=build)
        assert proc.returncode == 0 and calls == []
        assert proc.stdout.strip().startswith("torch: keeping the installed")


def test_an_explicit_build_replaces_the_other_one(tmp_path):
    proc, calls = _setup(
        tmp_path, gpu=True, installed="cuda 2.11.0+cu130", SINSTUDY_TORCH_BUILD="cpu"
    )
    assert proc.returncode == 0, proc.stderr
    assert calls[0].startswith("uninstall") and "--index-url" in calls[1]
    assert proc.stdout.strip().endswith("torch: installed 2.13.0+cpu (cpu build)")
    same = tmp_path / "same"
    same.mkdir()
    proc, calls = _setup(same, gpu=False, installed="cpu 2.13.0+cpu", SINSTUDY_TORCH_BUILD="cpu")
    assert calls == [] and "keeping" in proc.stdout


def test_an_unknown_build_is_one_line_and_installs_nothing(tmp_path):
    proc, calls = _setup(tmp_path, gpu=False, SINSTUDY_TORCH_BUILD="rocm")
    assert proc.returncode == 2 and calls == []
    assert proc.stderr.strip().splitlines() == [
        "install_torch: SINSTUDY_TORCH_BUILD=rocm is not a build; use auto, cpu or cuda"
    ]


def test_the_tested_torch_range_is_pyprojects_and_holds_this_torch():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f"torch{kernels.TESTED_TORCH}" in meta["dependencies"]
    low, high = (s.strip(">=<") for s in kernels.TESTED_TORCH.split(","))
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    assert tuple(map(int, low.split("."))) <= version < tuple(map(int, high.split(".")))
    kernels.check("cpu")  # every private kernel runs on this torch


def test_a_changed_private_kernel_is_one_line_naming_the_range_and_nothing_is_written(tmp_path):
    code = (
        "import sys, torch; del torch._fused_adam_; from study.cli import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "SINSTUDY_DEBUG"}
    proc = subprocess.run(
        [sys.executable, "-c", code, "run", "--n-trials", "1", "--no-progress"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sinstudy: error: torch "), proc.stderr
    assert f"torch{kernels.TESTED_TORCH}" in lines[0] and "--engine standard" in lines[0]
    assert not (tmp_path / "storage").exists()


def test_a_derivative_kernel_that_fails_is_reported(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("overload changed")

    act = kernels.ACTIVATIONS["tanh"]
    monkeypatch.setitem(
        kernels.ACTIVATIONS, "tanh", type(act)(act.module, act.forward, boom, act.zero_at_zero)
    )
    kernels.check.cache_clear()
    with pytest.raises(kernels.KernelError, match="overload changed"):
        kernels.check("cpu")
    kernels.check.cache_clear()
