from __future__ import annotations

import math

import optuna
import pytest
from conftest import run_cli

from study import compare
from study.compare import CellStats
from study.config import DataConfig
from study.data import make_data
from study.train import train


def test_compare_activation_end_to_end_on_the_batched_engine(workdir):
    r = run_cli(
        "compare", "activation", "--max-epochs", "40", "--seeds", "2", "--no-progress", cwd=workdir
    )
    assert r.returncode == 0, r.stderr
    assert "| relu | 2 |" in r.stdout and "| none (identity) | 2 |" in r.stdout
    assert "only the network with an activation fits" in r.stdout
    study = optuna.load_study(
        study_name="compare-activation-e40-s2", storage="sqlite:///storage/sinstudy.db"
    )
    # one trial per cell, its seeds side by side; each seed is what train.py gives for it alone
    assert sorted(t.params["cell"] for t in study.trials) == sorted(
        ("relu", "tanh", "none (identity)")
    )
    relu = next(t for t in study.trials if t.params["cell"] == "relu")
    assert (
        relu.user_attrs["engine"] == "batched"
        and relu.user_attrs["seeds"] == [0, 1]
        and len(relu.intermediate_values) == 40
    )
    factor = compare.FACTORS["activation"](40)
    data = make_data(DataConfig())
    alone = [train(compare.cell_config(factor, "relu", seed, 40), data) for seed in (0, 1)]
    assert relu.user_attrs["final_val_mse_per_seed"] == pytest.approx(
        [a.final_val_mse for a in alone], rel=1e-4
    )
    assert relu.user_attrs["final_test_mse_per_seed"] == pytest.approx(
        [a.final_test_mse for a in alone], rel=1e-4
    )
    assert (
        (workdir / "storage/compare/activation-e40-s2.md")
        .read_text()
        .startswith("## compare activation")
    )
    from optuna_dashboard._note import get_note_from_system_attrs

    note = get_note_from_system_attrs(study._storage.get_study_system_attrs(study._study_id), None)
    assert note["body"].startswith("## compare activation")  # the dashboard shows the table
    assert len(list((workdir / "storage/tensorboard/compare-activation-e40-s2").iterdir())) == 3
    # a second call resumes: nothing is missing, nothing is rerun
    r2 = run_cli(
        "compare", "activation", "--max-epochs", "40", "--seeds", "2", "--no-progress", cwd=workdir
    )
    assert (
        r2.returncode == 0
        and len(
            optuna.load_study(
                study_name="compare-activation-e40-s2", storage="sqlite:///storage/sinstudy.db"
            ).trials
        )
        == 3
    )


def test_compare_runs_each_data_set_of_a_factor_and_the_report_setup(tmp_path):
    """Cells with their own data (the report factor) train one engine run per data set; the
    report setup feeds raw x to plain SGD."""
    factor = compare.Factor(
        {"unit": {"depth": 1}, "raw": {"depth": 1, "data": {"input_scaling": "raw"}}}, {}, "?"
    )
    compare.FACTORS["_two_data_sets"] = lambda e: factor
    try:
        rows = compare.run(
            "_two_data_sets",
            f"sqlite:///{tmp_path}/c.db",
            epochs=3,
            seeds=2,
            device="cpu",
            setup="report",
            log_dir=str(tmp_path / "tb"),
            artifact_dir=str(tmp_path / "art"),
        )
    finally:
        del compare.FACTORS["_two_data_sets"]
    assert [r.cell for r in rows] == ["unit", "raw"] and all(r.n == 2 for r in rows)
    study = optuna.load_study(
        study_name="compare-_two_data_sets-e3-s2-report", storage=f"sqlite:///{tmp_path}/c.db"
    )
    setup = compare.SETUPS["report"]
    for t in study.trials:
        cell = t.params["cell"]
        data = make_data(compare.cell_data(factor, cell, setup))
        alone = [train(compare.cell_config(factor, cell, s, 3, setup), data) for s in (0, 1)]
        assert (
            alone[0].n_params == 32 + 32 + 32 + 1
            and compare.cell_config(factor, cell, 0, 3, setup).optimizer == "sgd"
        )
        assert t.user_attrs["final_val_mse_per_seed"] == pytest.approx(
            [a.final_val_mse for a in alone], rel=1e-4
        )
    assert compare.cell_data(factor, "raw", setup).input_scaling == "raw"
    assert compare.cell_data(factor, "unit", setup).n_train == 4800


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["speed"], "unknown comparison"),
        (["lr", "--seeds", "1"], "--seeds"),
        (["lr", "--setup", "paper"], "unknown --setup"),
        (["lr", "--max-epochs", "0"], "--max-epochs"),
    ],
)
def test_compare_bad_input(workdir, args, fragment):
    r = run_cli("compare", *args, cwd=workdir)
    assert (
        r.returncode == 2 and fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1
    ), r.stderr
    assert not (workdir / "storage").exists()


def _row(cell, test=1e-4, final_test=1e-4, val=1e-4, final_val=1e-4):
    return CellStats(cell, 3, (test, 0.0), (final_test, 0.0), (val, 0.0), (final_val, 0.0), "")


def test_lr_verdict_sees_the_rise_at_the_end():
    rows = [
        _row("lr 1e-4", val=1e-4, final_val=1.1e-4),
        _row("lr 1e-2", val=1e-4, final_val=5e-4, final_test=6e-4),
    ]
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


def test_settled_is_the_first_epoch_within_2x_of_the_best():
    assert compare.settled({1: 1.0, 2: 0.5, 3: 0.03, 4: 0.02, 5: 0.011, 6: 0.01}) == 4
    assert compare.settled({1: math.inf, 2: 0.5}) == 2 and compare.settled({}) is None


def test_report_verdict_says_which_setting_lands_within_2x():
    rows = []
    for h in compare.HYPOTHESES:
        close = h == "raw x, 4800 points, SGD 1e-3"
        for net, mse in compare.REPORT_TEST_MSE.items():
            rows.append(_row(f"{h} / {net}", test=mse * (1.5 if close else 10.0)))
    v = compare.verdicts("report", rows)
    assert len(v) == len(compare.HYPOTHESES)
    assert [line.split(":")[0] for line in v if "reproduces the report within 2x" in line] == [
        "raw x, 4800 points, SGD 1e-3"
    ]


def test_compare_refuses_a_stored_comparison_with_other_cells(workdir):
    (workdir / "storage").mkdir()
    url = "sqlite:///storage/sinstudy.db"
    old = optuna.create_study(study_name="compare-activation-e40-s2", storage=url)
    old.enqueue_trial({"cell": "relu"})
    trial = old.ask()
    trial.suggest_categorical("cell", ["relu", "sigmoid"])  # an older cell list
    old.tell(trial, 1.0)
    before = (workdir / "storage/sinstudy.db").read_bytes()
    r = run_cli("compare", "activation", "--max-epochs", "40", "--seeds", "2", cwd=workdir)
    assert r.returncode == 2 and "holds other cells" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2  # the no-GPU note, then the one error line
    assert (workdir / "storage/sinstudy.db").read_bytes() == before
