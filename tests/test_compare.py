from __future__ import annotations

import math

import optuna
import pytest

from conftest import run_cli
from study import compare
from study.compare import CellStats


def test_compare_activation_end_to_end(workdir):
    r = run_cli("compare", "activation", "--max-epochs", "40", "--seeds", "2", "--no-progress", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert "| relu | 2 |" in r.stdout and "| none (identity) | 2 |" in r.stdout
    assert "only the network with an activation fits" in r.stdout
    study = optuna.load_study(study_name="compare-activation-e40", storage="sqlite:///storage/sinstudy.db")
    assert sorted((t.params["cell"], t.params["seed"]) for t in study.trials) == sorted(
        (c, s) for c in ("relu", "tanh", "none (identity)") for s in range(2))
    assert all(len(t.intermediate_values) == 0 and t.user_attrs["epochs"] == 40 for t in study.trials)
    assert (workdir / "storage/compare/activation-e40.md").read_text().startswith("## compare activation")
    assert len(list((workdir / "storage/tensorboard/compare-activation-e40").iterdir())) == 6
    # a second call resumes: nothing is missing, nothing is rerun
    r2 = run_cli("compare", "activation", "--max-epochs", "40", "--seeds", "2", "--no-progress", cwd=workdir)
    assert r2.returncode == 0 and len(optuna.load_study(study_name="compare-activation-e40", storage="sqlite:///storage/sinstudy.db").trials) == 6


@pytest.mark.parametrize("args, fragment", [(["speed"], "unknown comparison"), (["lr", "--seeds", "1"], "--seeds"),
                                            (["lr", "--max-epochs", "0"], "--max-epochs")])
def test_compare_bad_input(workdir, args, fragment):
    r = run_cli("compare", *args, cwd=workdir)
    assert r.returncode == 2 and fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (workdir / "storage").exists()


def _row(cell, test=1e-4, final_test=1e-4, val=1e-4, final_val=1e-4):
    return CellStats(cell, 3, (test, 0.0), (final_test, 0.0), (val, 0.0), (final_val, 0.0), "")


def test_lr_verdict_sees_the_rise_at_the_end():
    rows = [_row("lr 1e-4", val=1e-4, final_val=1.1e-4), _row("lr 1e-2", val=1e-4, final_val=5e-4, final_test=6e-4)]
    v = compare.verdicts("lr", rows)
    assert "5.0x its best" in v[0] and "the rise near the end is there" in v[0]
    assert "1e-4 is better at the end" in v[1]


def test_scheduler_verdict_reproduces_only_when_both_hold():
    none = _row("no schedule", final_test=1e-4, final_val=2e-4)
    step = _row("step schedule", final_test=2e-4, final_val=1e-4)  # worse test, better validation
    cos = _row("cosine schedule", final_test=5e-5, final_val=1e-4)  # better on both
    v = compare.verdicts("scheduler", [none, step, cos])
    assert "reproduced" in v[0] and "not reproduced" not in v[0]
    assert "not reproduced" in v[1]


def test_mean_std():
    assert compare._mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
