"""The package a user installs: a wheel and an sdist built from the repository's files, the wheel
installed without -e into a fresh venv and run from a folder outside the checkout.

The fresh venv gets its dependencies (torch, Optuna, ...) from this test's environment through a
path file, so nothing is downloaded; `sinstudy` itself comes from the wheel alone (checked)."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from conftest import TINY_TOML

import study

ROOT = Path(__file__).resolve().parents[1]
VERSION = study.__version__  # the one source: pyproject.toml reads it (dynamic)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """A wheel and an sdist built by setuptools' PEP 517 hooks from a copy of the repository's
    files (so the checkout gets no build folders)."""
    src = tmp_path_factory.mktemp("src")
    junk = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("study", "tests", "scripts", "docs", "storage"):
        if (ROOT / name).exists():
            shutil.copytree(ROOT / name, src / name, ignore=junk)
    out = src / "dist"
    hooks = "from setuptools import build_meta as b; b.build_wheel('dist'); b.build_sdist('dist')"
    r = subprocess.run(
        [sys.executable, "-c", hooks], cwd=src, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,), (sdist,) = out.glob("*.whl"), out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def test_the_wheel_and_sdist_carry_every_module_and_no_tests(built):
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "study").rglob("*.py")}
    assert "study/run/batched/engine.py" in modules
    names = set(zipfile.ZipFile(built["wheel"]).namelist())
    assert modules <= names, sorted(modules - names)
    assert not [n for n in names if n.split("/")[0] in {"tests", "scripts", "docs", "storage"}]
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(built["wheel"]).read(meta).decode()
    assert f"Version: {VERSION}" in text and "Description-Content-Type: text/markdown" in text
    assert "# sinstudy" in text  # the README is the long description
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]  # one source

    import tarfile

    with tarfile.open(built["sdist"]) as tar:
        files = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"README.md", "pyproject.toml", "study/run/batched/engine.py"} <= files
    assert not [f for f in files if f.startswith("storage/") and f != "storage/.gitkeep"]


def test_the_installed_wheel_runs_a_study_outside_the_checkout(built, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    py = venv / "bin" / "python"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "-q"]
        + [built["wheel"]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # the dependencies, from this environment: its site-packages after the venv's own
    ours = subprocess.run(
        [py, "-c", "import site; print(site.getsitepackages()[0])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(ours, "_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    away = tmp_path / "elsewhere"
    away.mkdir()
    (away / "tiny.toml").write_text(TINY_TOML)
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    where = subprocess.run(
        [py, "-c", "import study.run.batched.engine as e; print(e.__file__)"],
        cwd=away,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout  # not the checkout's
    exe = str(venv / "bin" / "sinstudy")
    v = subprocess.run([exe, "--version"], cwd=away, env=env, capture_output=True, text=True)
    assert (v.returncode, v.stdout.strip()) == (0, f"sinstudy {VERSION}"), v.stderr
    run = subprocess.run(
        [exe, "run", "--config", "tiny.toml", "--max-epochs", "4", "--n-trials", "3"]
        + ["--no-progress"],
        cwd=away,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "best trial" in run.stdout.lower(), run.stdout
    assert (away / "storage" / "sinstudy.db").exists()
