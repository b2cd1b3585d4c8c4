from __future__ import annotations

import math
from dataclasses import replace

import optuna
import pytest
from conftest import run_cli

from study import compare
from study.compare import CellStats
from study.config import DataConfig
from study.trial.data import make_data
from study.trial.train import train


def test_compare_activation_end_to_end_on_the_batched_engine(workdir):
    r = run_cli(
        "compare", "activation", "--max-epochs", "40", "--seeds", "2", "--no-progress", cwd=workdir
    )
    assert r.returncode == 0, r.stderr
    assert "| relu | 2 |" in r.stdout and "| none (identity) | 2 |" in r.stdout
    assert "only with an activation does the network fit sin(x)" in r.stdout
    assert "| place | cell |" in r.stdout  # every cell ranked
    summary = next(ln for ln in r.stdout.splitlines() if ln.startswith("**Summary (2 seeds"))
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
    saved = (workdir / "storage/compare/activation-e40-s2.md").read_text()
    assert saved.startswith("## compare activation") and summary in saved
    from optuna_dashboard._note import get_note_from_system_attrs

    note = get_note_from_system_attrs(study._storage.get_study_system_attrs(study._study_id), None)
    assert note["body"].startswith("## compare activation")  # the dashboard shows the table
    assert summary in note["body"]
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


SPREAD = (0.9, 1.0, 1.1)  # three seeds, a tight spread around each cell's value


def _row(cell, test=1e-4, final_test=1e-4, val=1e-4, final_val=1e-4, spread=SPREAD, note=""):
    def seeds(x):
        return tuple(x * f for f in spread)

    return CellStats(
        cell, seeds(test), seeds(final_test), seeds(val), seeds(final_val), "", 10, note
    )


def test_evidence_welch_interval_and_seeds_to_settle_on_constructed_data():
    from scipy import stats as sps

    from study.compare.evidence import Spread, seeds_to_settle, welch

    a, b = [1e-4, 2e-4, 1.5e-4], [1e-3, 3e-3, 2e-3]
    gap = welch(Spread.of(a), Spread.of(b))
    la, lb = [math.log10(x) for x in a], [math.log10(x) for x in b]
    ref = sps.ttest_ind(la, lb, equal_var=False)  # scipy's own Welch test
    assert gap.p == pytest.approx(ref.pvalue) and gap.decided and gap.diff < 0
    ci = ref.confidence_interval(0.95)
    assert (gap.low, gap.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    noisy = welch(Spread.of([1e-4, 1e-2, 1e-5]), Spread.of([2e-4, 1e-5, 3e-3]))
    assert not noisy.decided
    n = seeds_to_settle(Spread.of([1e-4, 1e-2, 1e-5]), Spread.of([2e-4, 1e-5, 3e-3]))
    assert n is not None and n > 3
    assert seeds_to_settle(Spread.of([1.0, 2.0]), Spread.of([2.0, 1.0])) is None  # no gap


def test_ranking_orders_every_cell_and_ties_the_noisy_ones_with_the_best():
    rows = [
        _row("a", test=1e-3),
        _row("b", test=1e-5),  # the best
        _row("c", test=1.3e-5, spread=(0.1, 1.0, 10.0)),  # noisy: cannot be told from b
        _row("d", test=1e-2),
    ]
    text = compare.ranking(rows)
    order = [line.split("|")[2].strip() for line in text.splitlines()[2:6]]
    assert order == ["b", "c", "a", "d"]
    assert "Not told from the best at 3 seeds (undecided, not shown equal): b, c." in text
    assert text.count("| yes |") == 2 and "not yet: undecided" in text and "tied" not in text


def test_depth_verdict_is_clearly_only_where_the_seeds_decide_it():
    def rows(spread):
        return [
            _row("shallow (1 layer)", test=4e-5, spread=spread),
            _row("2 layers", test=2e-5, spread=spread),
            _row("deep (4 layers)", test=2.8e-5, spread=spread),
        ]

    (tight,) = compare.verdicts("depth", rows(SPREAD), epochs=200)
    assert tight.outcome == compare.HELD and "clearly lower" in tight.text
    assert "Welch on log10 MSE, 3 and 3 seeds" in tight.text
    (noisy,) = compare.verdicts("depth", rows((0.3, 1.0, 3.0)), epochs=200)
    assert noisy.outcome == compare.UNDECIDED and "clearly" not in noisy.text
    assert "seeds per cell would settle a gap this size: sinstudy compare depth" in noisy.text
    assert "--max-epochs 200 --seeds " in noisy.text
    line = compare.summary([tight, noisy], 3)
    assert line.startswith("Summary (3 seeds per cell, 95% level): held: deep fits better")
    assert "undecided: deep fits better than shallow" in line


def test_lr_verdict_sees_the_rise_at_the_end():
    rows = [
        _row("lr 1e-4", val=1e-4, final_val=1.1e-4),
        _row("lr 1e-2", val=1e-4, final_val=5e-4, final_test=6e-4),
    ]
    v = compare.verdicts("lr", rows, epochs=100)
    assert "ends at 5x its best" in v[0].text and v[0].outcome == compare.HELD
    assert v[1].outcome == compare.HELD and "clearly lower" in v[1].text


def test_scheduler_verdict_holds_only_when_both_hold():
    none = _row("no schedule", final_test=1e-4, final_val=2e-4)
    step = _row("step schedule", final_test=2e-4, final_val=1e-4)  # worse test, better val
    cos = _row("cosine schedule", final_test=5e-5, final_val=1e-4)  # better on both
    v = compare.verdicts("scheduler", [none, step, cos], epochs=100)
    assert [x.outcome for x in v] == [compare.HELD, compare.FAILED]


def test_mean_std():
    assert compare._mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))


def test_settled_is_the_epoch_from_which_the_curve_stays_near_its_best_or_never():
    assert compare.settled({1: 1.0, 2: 0.5, 3: 0.03, 4: 0.02, 5: 0.011, 6: 0.01}) == 4
    # it dips within 2x early, leaves, and comes back: settled from where it stays
    assert compare.settled({1: 1.0, 2: 0.015, 3: 0.5, 4: 0.02, 5: 0.01}) == 4
    assert compare.settled({1: math.inf, 2: 1.0, 3: 0.05}) == 3
    assert compare.settled({1: 1.0, 2: 0.01, 3: 0.05}) is None  # ends above 2x its best: rose
    assert compare.settled({1: 0.4, 2: 0.2, 3: 0.17, 4: 0.18}) is None  # never learned
    assert compare.settled({}) is None
    text = compare.table([_row("x"), replace(_row("y"), settled=None)])
    assert "| 10 |" in text and "| never |" in text and "±" in text and "+-" not in text


def test_a_schedule_that_cannot_act_within_the_epochs_is_flagged():
    factor = compare.FACTORS["report"](100)
    setup = compare.SETUPS["default"]
    cell = "raw x, 4800 points, SGD 1e-2 halved every 100 epochs / deep"
    words = compare.never_acts(compare.cell_config(factor, cell, 0, 100, setup))
    assert "never acts within 100 epochs" in words and "above 100" in words
    assert compare.never_acts(compare.cell_config(factor, cell, 0, 101, setup)) == ""
    assert "never acts within 100 epochs" in compare.describe_base(100, "report")
    assert "never acts" not in compare.describe_base(1000, "report")
    text = compare.table([_row(cell, note=words)])
    assert f"| {cell} (*) |" in text and f"(*) {cell}: its schedule" in text


def test_report_verdict_says_which_setting_lands_within_2x():
    rows = []
    for h in compare.HYPOTHESES:
        close = h == "raw x, 4800 points, SGD 1e-3"
        for net, mse in compare.REPORT_TEST_MSE.items():
            rows.append(_row(f"{h} / {net}", test=mse * (1.2 if close else 10.0)))
    v = compare.verdicts("report", rows, epochs=100)
    assert len(v) == len(compare.HYPOTHESES)
    assert [x.claim for x in v if x.outcome == compare.HELD] == ["raw x, 4800 points, SGD 1e-3"]
    assert all("reproduces the report within 2x" in x.text for x in v if x.outcome == "held")
    line = compare.summary(v, 3, 100)
    assert "held: raw x, 4800 points, SGD 1e-3." in line
    assert f"did not hold: {len(v) - 1} claims (listed above)" in line
    # a verdict at fewer epochs than the report's says so
    assert "(3 seeds per cell, 95% level, 100 epochs (the report trained 1,000))" in line
    assert "epochs" not in compare.summary(v, 3, 1000)


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
