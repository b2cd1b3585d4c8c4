"""Analysis data on synthetic studies (exact answers known), and the figures drawn from it."""

from __future__ import annotations

import math

import numpy as np
import optuna
import plotly.graph_objects as go
import pytest
import torch
from torch import nn

from study.trial.data import TWO_PI
from study.views import analysis, plots


@pytest.fixture(scope="module")
def synthetic():
    """60 trials whose value depends on lr alone: every evaluator must rank lr first."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))

    def objective(trial):
        trial.suggest_int("depth", 1, 6)
        trial.suggest_int("width", 8, 256, log=True)
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        trial.suggest_categorical("activation", ["relu", "tanh", "silu"])
        value = (math.log10(lr) + 2.5) ** 2 + 1e-3
        for epoch in range(1, 4):
            trial.report(value * (4 - epoch), epoch)
        trial.set_user_attr("test_mse", value * 1.1)
        return value

    study.optimize(objective, n_trials=60)
    return study


@pytest.mark.parametrize("evaluator", analysis.EVALUATORS)
def test_the_parameter_that_decides_ranks_first(synthetic, evaluator):
    imp = analysis.importances(synthetic, evaluator)
    assert next(iter(imp)) == "lr"
    assert imp["lr"] > 0.5
    assert sum(imp.values()) == pytest.approx(1.0)


def test_too_few_trials_is_a_sentence_not_a_crash():
    study = optuna.create_study()
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert "needs >= 5 complete trials" in analysis.importance_shortfall(study)
    figs, notes = plots.study_figures(study)
    assert not any(k.startswith("importance") for k in figs) and notes


def test_top_trials_sorted(synthetic):
    top = analysis.top_trials(synthetic, 10)
    values = [t.value for t in top]
    assert len(top) == 10 and values == sorted(values) and values[0] == synthetic.best_value


class _Sin(nn.Module):
    def forward(self, x):  # x is the normalised input in [-1, 1): undo it
        return torch.sin((x + 1) * math.pi)


class _Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def test_fit_of_a_perfect_and_a_zero_model():
    f = analysis.fit(_Sin(), n=500)
    assert f.x.shape == (500,) and 0 < f.x[0] < f.x[-1] < TWO_PI
    assert f.mse < 1e-12 and np.abs(f.residual).max() < 1e-5
    z = analysis.fit(_Zero(), n=500)
    assert z.mse == pytest.approx(0.5, rel=1e-3)  # mean of sin^2
    np.testing.assert_allclose(z.residual, -z.target, atol=1e-12)


def test_figures_have_the_expected_traces(synthetic):
    figs, notes = plots.study_figures(synthetic)
    assert not notes
    expected = {
        "history",
        "intermediate_values",
        "parallel_coordinate",
        "slice",
        "edf",
        "timeline",
        "contour_lr_depth",
        "contour_lr_width",
        "importance_ped_anova",
        "importance_fanova",
    }
    assert expected == set(figs)
    par = figs["parallel_coordinate"]  # Optuna 5 draws one line per trial on shared axes
    assert set(par.layout.xaxis.ticktext) == {
        "log10 val MSE",
        "depth",
        "width",
        "lr",
        "activation",
    }
    assert sum(len(t.x) == 5 for t in par.data) >= 60
    assert len(figs["intermediate_values"].data) == 60  # one curve per trial
    bars = figs["importance_fanova"].data[0]
    # plotly draws the largest last (top)
    assert isinstance(bars, go.Bar) and list(bars.y)[-1] == "lr"
    # each bar with its 95% interval over the bootstrap resamples
    lows = [v - m for v, m in zip(bars.x, bars.error_x.arrayminus, strict=True)]
    highs = [v + p for v, p in zip(bars.x, bars.error_x.array, strict=True)]
    assert all(0 <= lo <= hi <= 1 + 1e-9 for lo, hi in zip(lows, highs, strict=True))
    assert "95% interval" in figs["importance_fanova"].layout.title.text
    assert figs["history"].layout.yaxis.type == "log"
    fit = plots.fit_figure(analysis.fit(_Sin(), n=100))
    assert [t.name for t in fit.data] == ["sin(x)", "network", "residual"]
    assert len(fit.data[0].x) == 100
