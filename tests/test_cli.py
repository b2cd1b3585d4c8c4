"""End-to-end: the real CLI in a subprocess on a temporary folder, read back with plain Optuna."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import TINY_TOML, run_cli
from optuna.trial import TrialState

TINY = ["--config", "tiny.toml", "--max-epochs", "6", "--no-progress"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def base_study(tmp_path_factory):
    """A 12-trial study made once by `sinstudy run` in an empty folder."""
    folder = tmp_path_factory.mktemp("base")
    (folder / "tiny.toml").write_text(TINY_TOML)
    r = run_cli("run", *TINY, "--n-trials", "12", cwd=folder)
    assert r.returncode == 0, r.stderr
    return folder, r


@pytest.fixture
def ran(base_study, workdir):
    """A private copy of the base study in this test's working folder."""
    folder, r = base_study
    shutil.copytree(folder, workdir, dirs_exist_ok=True)
    return workdir, r


def test_run_creates_storage_and_everything_reads_back_with_plain_optuna(ran):
    workdir, r = ran
    assert (workdir / "storage/sinstudy.db").exists()
    assert "no GPU found" in r.stderr
    for word in (
        "best trial",
        "val MSE",
        "test MSE",
        "complete",
        "pruned",
        "tensorboard",
        "optuna-dashboard",
    ):
        assert word in r.stdout
    study = optuna.load_study(study_name="sinstudy", storage="sqlite:///storage/sinstudy.db")
    trials = study.get_trials()
    assert len(trials) == 12
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert any(t.state == TrialState.PRUNED for t in trials)  # Hyperband stops the worst early
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert complete
    for t in complete:
        assert set(t.params) == {"depth", "width", "lr", "activation"}
        assert t.distributions["lr"] == optuna.distributions.FloatDistribution(
            1e-3, 3e-2, log=True
        )
        assert sorted(t.intermediate_values) == list(range(1, 7))  # one value per epoch
        assert t.value == pytest.approx(min(t.intermediate_values.values()))
        for key in ("test_mse", "n_params", "epochs", "seconds", "device"):
            assert key in t.user_attrs
    best = study.best_trial
    art = best.user_attrs["model_artifact"]
    assert (workdir / "storage/artifacts" / art).exists()
    assert optuna.artifacts.get_all_artifact_meta(best, storage=study._storage)
    assert f"#{best.number}" in r.stdout


def test_tensorboard_runs_are_readable_with_tensorboards_reader(ran):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workdir, _ = ran
    runs = sorted((workdir / "storage/tensorboard/sinstudy").glob("trial-*"))
    assert [p.name for p in runs] == [f"trial-{i:04d}" for i in range(12)]
    study = optuna.load_study(study_name="sinstudy", storage="sqlite:///storage/sinstudy.db")
    for t in study.get_trials():
        acc = EventAccumulator(str(workdir / f"storage/tensorboard/sinstudy/trial-{t.number:04d}"))
        acc.Reload()
        assert {"loss/train", "mse/val", "lr"} <= set(acc.Tags()["scalars"])
        # the HParams tab
        assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
        vals = [e.value for e in acc.Scalars("mse/val")]
        assert vals == pytest.approx(
            [t.intermediate_values[s] for s in sorted(t.intermediate_values)], rel=1e-6
        )


def test_resume_adds_trials_to_the_same_study(ran):
    workdir, _ = ran
    r = run_cli("run", *TINY, "--n-trials", "3", cwd=workdir)
    assert r.returncode == 0, r.stderr
    study = optuna.load_study(study_name="sinstudy", storage="sqlite:///storage/sinstudy.db")
    assert [t.number for t in study.trials] == list(range(15))
    assert "whole study" in r.stdout and "this run" in r.stdout


def test_a_run_of_another_budget_joins_the_study_and_says_so(ran):
    """Before: a run with another --max-epochs joined a study of 6-epoch trials silently."""
    workdir, _ = ran
    r = run_cli("run", *TINY, "--max-epochs", "3", "--n-trials", "1", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert (
        "note: study 'sinstudy' was created with 6 epochs per trial and this run trains 3: the "
        "views rank both budgets' values as one; --max-epochs 6 keeps them comparable" in r.stderr
    ), r.stderr
    same = run_cli("run", *TINY, "--n-trials", "1", cwd=workdir)
    assert same.returncode == 0 and "epochs per trial" not in same.stderr, same.stderr


def test_best_prints_from_storage(ran):
    workdir, _ = ran
    r = run_cli("best", cwd=workdir)
    assert r.returncode == 0, r.stderr
    study = optuna.load_study(study_name="sinstudy", storage="sqlite:///storage/sinstudy.db")
    assert f"#{study.best_trial.number}" in r.stdout
    assert f"{study.best_value:.3e}" in r.stdout


def test_readers_find_the_artifacts_beside_the_storage_from_any_folder(ran, tmp_path):
    """Artifacts and TensorBoard runs go beside a SQLite file: a reader given only the URL finds
    them from another folder (before: `plot` there failed with "ArtifactNotFound: not found").
    A folder that lacks them is one line naming the file and the flag that fixes it."""
    workdir, _ = ran
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    url = f"sqlite:///{workdir}/storage/sinstudy.db"
    r = run_cli("plot", "--storage", url, "--no-png", "--out", "p", cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert (elsewhere / "p/fit.html").exists() and not (elsewhere / "storage").exists()
    empty = elsewhere / "empty"
    empty.mkdir()
    r = run_cli("plot", "--storage", url, "--artifact-dir", str(empty), cwd=elsewhere)
    best = optuna.load_study(study_name="sinstudy", storage=url).best_trial
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"{empty / best.user_attrs['model_artifact']}" in r.stderr
    assert "--artifact-dir" in r.stderr


def test_best_into_a_closed_pipe_ends_quietly(ran):
    """`sinstudy best | head -1`: head exits and the rest of the output meets a closed pipe.
    Before: "sinstudy: error: BrokenPipeError" and an "Exception ignored" message at exit."""
    workdir, _ = ran
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "study", "best"],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGPIPE
    assert err == "", err


def test_standard_engine_same_seed_same_params_and_values(workdir):
    out = []
    for name in ("a", "b"):
        folder = workdir / name  # a folder each: each storage its own TensorBoard runs
        folder.mkdir()
        (folder / "tiny.toml").write_text((workdir / "tiny.toml").read_text())
        r = run_cli(
            "run", *TINY, "--n-trials", "6", "--seed", "3", "--engine", "standard", cwd=folder
        )
        assert r.returncode == 0, r.stderr  # (the batched engine: test_batched.py)
        trials = optuna.load_study(
            study_name="sinstudy", storage=f"sqlite:///{folder}/storage/sinstudy.db"
        ).trials
        out.append([(t.params, t.state, t.value, t.intermediate_values) for t in trials])
    assert out[0] == out[1]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--n-trials", "0"], "--n-trials"),
        (["--n-trials", "many"], "invalid int value"),
        (["--sampler", "bayes"], "unknown sampler"),
        (["--pruner", "asha"], "unknown pruner"),
        (["--stacks", "packed"], "unknown stacks"),
        (["--device", "tpu"], "device"),
        (["--device", "cuda"], "not available"),
        (["--storage", "mongodb://x/y"], "unsupported storage URL"),
        (["--config", "missing.toml"], "does not exist"),
        (["--config", "bad_key.toml"], "unknown key"),
        (["--config", "bad_act.toml"], "unknown activation"),
        (["--config", "reversed.toml"], "reversed"),
        (["--config", "empty.toml"], "non-empty list"),
        (["--config", "other_space.toml"], "another search_space"),
        (["--bogus-flag"], "unrecognized arguments"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_leaves_storage_untouched(ran, args, fragment):
    workdir, _ = ran
    (workdir / "bad_key.toml").write_text("[search_space]\ndeep = [1, 2]\n")
    (workdir / "bad_act.toml").write_text('[search_space]\nactivation = ["swish"]\n')
    (workdir / "reversed.toml").write_text("[search_space]\nwidth = [64, 8]\n")
    (workdir / "empty.toml").write_text("[search_space]\nactivation = []\n")
    (workdir / "other_space.toml").write_text(
        TINY_TOML.replace("depth = [1, 2]", "depth = [1, 3]")
    )
    db = workdir / "storage/sinstudy.db"
    before = _digest(db)
    r = run_cli("run", "--no-progress", "--n-trials", "1", *args, cwd=workdir)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert _digest(db) == before


@pytest.mark.parametrize("kind", ["corrupt", "foreign"])
def test_corrupt_or_foreign_database_is_refused_and_unchanged(workdir, kind):
    import sqlite3

    db = workdir / "x.db"
    if kind == "corrupt":
        db.write_bytes(b"\x00garbage" * 64)
    else:
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE invoices (id INTEGER)")
        con.commit()
        con.close()
    before = _digest(db)
    r = run_cli("run", *TINY, "--n-trials", "1", "--storage", "sqlite:///x.db", cwd=workdir)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert _digest(db) == before


def test_best_on_missing_storage_or_study(workdir):
    r = run_cli("best", cwd=workdir)
    assert r.returncode == 2 and "run `sinstudy run` first" in r.stderr
    assert not (workdir / "storage").exists()


def test_module_and_console_script_are_the_same_cli(workdir):
    import subprocess

    # beside this interpreter (a venv's bin/), so an activated venv is not needed
    beside = Path(sys.executable).with_name("sinstudy")
    exe = str(beside) if beside.exists() else shutil.which("sinstudy")
    assert exe is not None, "the console script `sinstudy` is missing (bash scripts/setup.sh)"
    a = subprocess.run([exe, "--help"], capture_output=True, text=True)
    b = run_cli("--help", cwd=workdir)
    assert a.returncode == b.returncode == 0
    assert a.stdout.replace("sinstudy", "") == b.stdout.replace("sinstudy", "")


@pytest.mark.parametrize("engine", ["batched", "standard"])
def test_grid_sampler_stops_when_the_grid_is_done(workdir, engine):
    # 3 activations: 3 points
    (workdir / "g.toml").write_text(
        TINY_TOML.replace("depth = [1, 2]", "depth = [1]")
        .replace("width = [4, 16]", "width = [4]")
        .replace("lr = [1e-3, 3e-2]", "lr = [1e-3]")
    )
    r = run_cli(
        "run",
        "--config",
        "g.toml",
        "--max-epochs",
        "3",
        "--no-progress",
        "--sampler",
        "grid",
        "--pruner",
        "none",
        "--engine",
        engine,
        "--n-trials",
        "8",
        cwd=workdir,
    )
    assert r.returncode == 0, r.stderr
    trials = optuna.load_study(
        study_name="sinstudy", storage="sqlite:///storage/sinstudy.db"
    ).trials
    assert sorted(t.params["activation"] for t in trials) == ["identity", "relu", "tanh"]


def test_a_bad_run_flag_is_refused_before_torch_or_optuna_load(workdir):
    import subprocess

    probe = (
        "import sys; from study.cli import main; rc = main(['run', '--slots', '0']); "
        "print(rc, sorted({'torch', 'optuna', 'sqlalchemy'} & set(sys.modules)))"
    )
    r = subprocess.run([sys.executable, "-c", probe], cwd=workdir, capture_output=True, text=True)
    assert r.stdout.split("\n")[0] == "2 []", (r.stdout, r.stderr)
    assert "--slots" in r.stderr and "Traceback" not in r.stderr
    assert not (workdir / "storage").exists()


def test_version_is_the_projects(workdir):
    from importlib.metadata import version

    import study

    # one source: study.__version__, which the installed metadata took from pyproject's dynamic
    assert version("sinstudy") == study.__version__
    r = run_cli("--version", cwd=workdir)
    assert (r.returncode, r.stdout.strip()) == (0, f"sinstudy {study.__version__}"), r.stderr


def test_a_handled_ctrl_c_does_not_end_the_program_by_sigint(workdir):
    """A KeyboardInterrupt that leaves code run from a string (`exec`/`eval`: dataclasses and
    typing do so while modules import) sets CPython's "unhandled KeyboardInterrupt" flag, and
    with it still set `python -m` kills itself by SIGINT after its teardown, whatever status it
    exits with. Here Ctrl-C lands in such code inside a command: the status must be 130."""
    probe = (
        "from study import cli\n"
        "cli.cmd_best = lambda args: exec('raise KeyboardInterrupt')\n"
        "cli.entry(['best'])\n"
    )
    (workdir / "probe.py").write_text(probe)  # a module: `-c` and scripts never read the flag
    cmd = [sys.executable, "-m", "probe"]
    r = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    assert (r.returncode, r.stderr) == (130, "sinstudy: interrupted\n")


@pytest.mark.parametrize("command", ["run", "best", "compare depth"])
def test_a_mistyped_flag_names_its_commands_help(command, capsys):
    from study.cli import main

    with pytest.raises(SystemExit) as e:
        main([*command.split(), "--stdy", "x"])
    first = command.split()[0]
    expected = f"sinstudy: error: unrecognized arguments: --stdy x (see sinstudy {first} --help)\n"
    assert (e.value.code, capsys.readouterr().err) == (2, expected)


def test_readers_say_the_study_must_exist(capsys):
    from study.cli import build_parser

    for command, says in [("run", "an existing one is continued"), ("best", "it must exist")]:
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        assert says in " ".join(capsys.readouterr().out.split())
