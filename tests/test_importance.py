"""Importances with intervals on synthetic studies whose answer is known, and a check of the
check: the same test fails on an evaluator that ranks at random."""

from __future__ import annotations

import json
import math
import random

import optuna
import pytest
from conftest import run_cli

from study.views import analysis, importance

PARAMS = {"depth", "width", "lr", "activation"}


def _study(value, n: int = 60, seed: int = 1, directions=("minimize",)) -> optuna.Study:
    """`n` random trials of the default space whose value is `value(params)`."""
    study = optuna.create_study(
        directions=list(directions), sampler=optuna.samplers.RandomSampler(seed=seed)
    )

    def objective(trial):
        p = {
            "depth": trial.suggest_int("depth", 1, 6),
            "width": trial.suggest_int("width", 8, 256, log=True),
            "lr": trial.suggest_float("lr", 1e-4, 1e-1, log=True),
            "activation": trial.suggest_categorical("activation", ["relu", "tanh", "silu"]),
        }
        return value(p)

    study.optimize(objective, n_trials=n)
    return study


def _by_lr(p):
    return (math.log10(p["lr"]) + 2.5) ** 2 + 1e-3


def _by_lr_and_depth(p):
    return (math.log10(p["lr"]) + 2.5) ** 2 + 0.5 * (p["depth"] - 3.5) ** 2 + 1e-3


def _sane(found: importance.Importances, deciding: set[str]) -> bool:
    """Every evaluator puts the deciding parameters on top, above every other parameter's
    value; each other parameter's interval reaches (near) zero; one deciding parameter is first
    in a stable share of resamples (of two, either may lead)."""
    for e in found.evaluated:
        top = [r for r in e.rows if r.param in deciding]
        rest = [r for r in e.rows if r.param not in deciding]
        if {r.param for r in e.rows[: len(deciding)]} != deciding:
            return False
        if len(deciding) == 1 and not e.stable:
            return False
        if any(r.low > 0.05 or r.value >= min(d.low for d in top) for r in rest):
            return False
    return True


@pytest.fixture(scope="module")
def one():
    return importance.evaluate(_study(_by_lr), resamples=20)


def test_a_value_of_one_parameter_puts_the_others_near_zero(one):
    assert _sane(one, {"lr"}), importance.lines(one)
    assert set(one.params) == PARAMS and one.trials == 60 and one.resamples == 20
    for e in one.evaluated:
        lr = e.of("lr")
        assert lr.first >= importance.STABLE and lr.low > 0.5 and lr.low <= lr.high
    assert not one.disagreements()
    said = "\n".join(importance.lines(one))
    assert "lr first in" in said and "the evaluators agree" in said and "not yet" not in said


def test_a_value_of_two_parameters_puts_both_on_top():
    found = importance.evaluate(_study(_by_lr_and_depth), resamples=20)
    assert _sane(found, {"lr", "depth"}), importance.lines(found)


def test_the_check_fails_on_an_evaluator_that_ranks_at_random(monkeypatch, one):
    """The sanity rule above is not one that any output passes."""

    class Random(optuna.importance.BaseImportanceEvaluator):
        def __init__(self, seed=0):
            self.rng = random.Random(seed)

        def evaluate(self, study, params=None, *, target=None):
            names = params or sorted(study.trials[0].params)
            raw = {p: self.rng.random() for p in names}
            return dict(sorted(raw.items(), key=lambda kv: -kv[1]))

    monkeypatch.setattr(analysis, "make_evaluator", lambda name, seed=0: Random(seed))
    broken = importance.evaluate(_study(_by_lr), ("fanova",), resamples=20)
    assert not _sane(broken, {"lr"})
    assert _sane(one, {"lr"})


def test_a_parameter_count_is_computed_on_depth_and_width_alone():
    """Before: lr 0.13 and activation 0.08 for n_params, an evaluator's artefact."""

    def values(p):
        return _by_lr(p), p["depth"] * p["width"] ** 2

    study = _study(values, directions=("minimize", "minimize"))
    study.set_metric_names(["val_mse", "n_params"])
    found = importance.evaluate(study, objective=1, resamples=10)
    assert found.objective == "n_params" and set(found.structural) == {"depth", "width"}
    for e in found.evaluated:
        assert {r.param for r in e.rows if r.structural} == {"lr", "activation"}
        assert all(r.value == 0 for r in e.rows if r.structural)
        assert {r.param for r in e.rows[:2]} == {"depth", "width"}
    said = "\n".join(importance.lines(found))
    assert "n_params is a function of depth, width alone" in said
    assert "0 (by construction)" in said


def test_intervals_that_do_not_overlap_are_a_disagreement_not_two_numbers():
    rows_a = [
        importance.Interval("lr", 0.8, 0.7, 0.9, 1.0),
        importance.Interval("x", 0.2, 0, 0.3, 0),
    ]
    rows_b = [
        importance.Interval("x", 0.6, 0.5, 0.7, 0.9),
        importance.Interval("lr", 0.4, 0.35, 0.6, 0.1),
    ]
    found = importance.Importances(
        "s",
        "val_mse",
        30,
        20,
        [importance.Evaluated("ped-anova", rows_a), importance.Evaluated("fanova", rows_b)],
        params=["lr", "x"],
    )
    assert found.disagreements() == ["lr", "x"]
    said = "\n".join(importance.lines(found))
    assert "the evaluators disagree (lr: PED-ANOVA 0.70-0.90, fANOVA 0.35-0.60" in said


def test_too_few_trials_for_a_stable_ranking_says_so_with_the_share_at_half():
    noise = random.Random(3)
    found = importance.evaluate(_study(lambda p: noise.random(), n=8), resamples=20)
    unstable = [e for e in found.evaluated if not e.stable]
    assert unstable, importance.lines(found)
    assert all(e.half_first is not None for e in unstable)
    said = "\n".join(importance.lines(found))
    assert "not yet stable" in said and "of 8 trials" in said and "of 4;" in said
    assert "more trials would help" in said


def test_the_importance_command_prints_intervals_and_json(workdir):
    r = run_cli(
        "run", "--config", "tiny.toml", "--no-progress", "--n-trials", "8", "--max-epochs", "3",
        "--pruner", "none", cwd=workdir,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    text = run_cli("importance", "--resamples", "5", cwd=workdir)
    assert text.returncode == 0, text.stderr
    assert "95% intervals" in text.stdout and "first in" in text.stdout, text.stdout
    assert "PED-ANOVA" in text.stdout and "fANOVA" in text.stdout and "[" in text.stdout
    got = run_cli("importance", "--json", "--evaluator", "fanova", "--resamples", "5", cwd=workdir)
    assert got.returncode == 0, got.stderr
    (one,) = json.loads(got.stdout)
    assert one["objective"] == "val_mse" and one["trials"] == 8 and one["resamples"] == 5
    rows = one["evaluated"][0]["rows"]
    assert {r["param"] for r in rows} == PARAMS
    assert all(r["low"] <= r["high"] for r in rows)
    bad = run_cli("importance", "--resamples", "1", cwd=workdir)
    assert bad.returncode == 2 and "--resamples must be from 2" in bad.stderr


def _curved_study(early, late, n: int = 60) -> optuna.Study:
    """Trials of 27 epochs (its config says so) whose curve follows `early(params)` up to epoch
    9 and `late(params)` after; a third are pruned at epoch 3 or 9, as Hyperband's rungs."""
    from optuna.distributions import CategoricalDistribution as Cat
    from optuna.distributions import FloatDistribution as Float
    from optuna.distributions import IntDistribution as Int
    from optuna.trial import TrialState, create_trial

    rng = random.Random(5)
    dists = {
        "depth": Int(1, 6),
        "width": Int(8, 256, log=True),
        "lr": Float(1e-4, 1e-1, log=True),
        "activation": Cat(["relu", "tanh", "silu"]),
    }
    study = optuna.create_study()
    study.set_user_attr("config", json.dumps({"train": {"max_epochs": 27}}))
    for i in range(n):
        p = {
            "depth": rng.randint(1, 6),
            "width": round(math.exp(rng.uniform(math.log(8), math.log(256)))),
            "lr": math.exp(rng.uniform(math.log(1e-4), math.log(1e-1))),
            "activation": rng.choice(["relu", "tanh", "silu"]),
        }
        curve = {e: (early(p) if e <= 9 else late(p)) * (28 - e) / 27 for e in range(1, 28)}
        stop = [27, 27, 3, 9][i % 4] if i % 3 == 0 else 27
        kept = {e: v for e, v in curve.items() if e <= stop}
        done = stop == 27
        study.add_trial(
            create_trial(
                params=p,
                distributions=dists,
                state=TrialState.COMPLETE if done else TrialState.PRUNED,
                value=min(kept.values()) if done else None,
                intermediate_values=kept,
            )
        )
    return study


def test_pruned_trials_count_at_each_budget_they_reached():
    study = _curved_study(_by_lr, _by_lr)
    fid = importance.fidelities(study, ("fanova",), resamples=10)
    assert [(f.epoch, f.complete) for f in fid] == [(1, False), (3, False), (9, False), (27, True)]
    reached = [f.found.trials for f in fid]
    assert reached[0] == 60 and reached[0] >= reached[1] >= reached[2] > reached[3]
    assert all(f.found.evaluated[0].leader.param == "lr" for f in fid)
    said = "\n".join(importance.fidelity_lines(fid))
    assert "the leader, lr, holds from epoch 1 to the last" in said


def test_a_ranking_that_changes_with_the_budget_is_said_to():
    def by_depth(p):
        return 0.5 * (p["depth"] - 3.5) ** 2 + 1e-3

    fid = importance.fidelities(_curved_study(by_depth, _by_lr), ("fanova",), resamples=10)
    assert fid[0].found.evaluated[0].leader.param == "depth"
    assert fid[-1].found.evaluated[0].leader.param == "lr"
    assert "the leader changes with the budget (depth, lr)" in "\n".join(
        importance.fidelity_lines(fid)
    )


def test_the_note_resamples_small_studies_and_names_the_command_for_large_ones():
    """Every run waits for its note: past NOTE_MAX_TRIALS complete trials it shows the values
    alone and says where the intervals are."""
    from study.views.dashboard import study_note

    study = _study(_by_lr, n=importance.NOTE_MAX_TRIALS + 5)
    large = study_note(study)
    assert "values alone (intervals: sinstudy importance)" in large and "[0." not in large
    small = study_note(study, resamples=5)
    assert "5 bootstrap resamples, 95% intervals" in small and "| lr | 0." in small
    assert "[" in small.split("| lr |")[1].splitlines()[0]
