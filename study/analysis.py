"""What a study says, as plain data: importances, top trials, the best fit. No drawing here.

Everything reads the storage (and the best-model artifact); nothing retrains.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from .data import TWO_PI, scale_inputs
from .quiet import experimental

EVALUATORS = ("ped-anova", "fanova")
MIN_TRIALS_FOR_IMPORTANCE = 5  # complete trials; below this importances are noise (or fail)


class Fit(NamedTuple):
    x: np.ndarray  # (N,) raw x in [0, 2*pi)
    target: np.ndarray  # sin(x)
    prediction: np.ndarray  # the network's output
    residual: np.ndarray  # prediction - target
    mse: float


class ImportanceRow(NamedTuple):
    param: str
    ped_anova: float | None
    fanova: float | None


def complete_trials(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def importance_shortfall(study: optuna.Study) -> str | None:
    """None when importances can be computed; else one line saying why not."""
    n = len(complete_trials(study))
    if n < MIN_TRIALS_FOR_IMPORTANCE:
        return (
            f"parameter importance needs >= {MIN_TRIALS_FOR_IMPORTANCE} complete trials (study "
            f"has {n}); run more trials"
        )
    return None


def make_evaluator(name: str, seed: int = 0) -> optuna.importance.BaseImportanceEvaluator:
    # imported here: fANOVA pulls in scikit-learn, slow to import, which the objective's fit
    # image never needs
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    if name == "fanova":
        return FanovaImportanceEvaluator(seed=seed)
    with experimental():
        # Optuna's defaults: how much each parameter matters for reaching the top 10% of the
        # complete trials (pruned trials' values are partial curves and are left out).
        return PedAnovaImportanceEvaluator()


def importances(study: optuna.Study, evaluator: str, seed: int = 0) -> dict[str, float]:
    """Normalised importances (sum 1), largest first."""
    with experimental():
        return optuna.importance.get_param_importances(
            study, evaluator=make_evaluator(evaluator, seed), normalize=True
        )


def importance_table(study: optuna.Study) -> list[ImportanceRow]:
    """Both evaluators side by side, ordered by fANOVA."""
    ped, fan = importances(study, "ped-anova"), importances(study, "fanova")
    params = sorted(set(ped) | set(fan), key=lambda p: -fan.get(p, 0.0))
    return [ImportanceRow(p, ped.get(p), fan.get(p)) for p in params]


def top_trials(study: optuna.Study, k: int = 10) -> list[FrozenTrial]:
    return sorted(complete_trials(study), key=lambda t: t.value)[:k]


@torch.no_grad()
def fit(model: nn.Module, n: int = 1000, scaling: str = "unit") -> Fit:
    """The model's prediction on a dense grid over [0, 2*pi) (cell centres, as the test set),
    fed as it was trained (`scaling`: the study's data.input_scaling)."""
    x = (torch.arange(n, dtype=torch.float64) + 0.5) * (TWO_PI / n)
    pred = model(scale_inputs(x, scaling).float().unsqueeze(1)).squeeze(1).double()
    target = torch.sin(x)
    resid = pred - target
    return Fit(x.numpy(), target.numpy(), pred.numpy(), resid.numpy(), float(torch.mean(resid**2)))


class Counts(NamedTuple):
    complete: int
    pruned: int
    failed: int

    @classmethod
    def of(cls, trials: list[FrozenTrial]) -> Counts:
        states = [t.state for t in trials]
        return cls(
            states.count(TrialState.COMPLETE),
            states.count(TrialState.PRUNED),
            states.count(TrialState.FAIL),
        )


def params_text(params: dict) -> str:
    """depth=3, width=149, lr=0.0054, activation=tanh"""
    return ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


def fmt_mse(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.3e}"


def _spread(t: FrozenTrial, text: str, std_key: str) -> str:
    """A trial with repeats: its mean, +- the standard deviation over its seeds."""
    std = t.user_attrs.get(std_key)
    if std is None or text == "n/a":
        return text
    return f"{text} ± {std:.1e}" if math.isfinite(std) else text


def mse_texts(t: FrozenTrial) -> tuple[str, str]:
    """The trial's validation and test MSE; with repeats, each the mean over its seeds ± their
    standard deviation."""
    return (
        _spread(t, fmt_mse(t.value), "val_mse_std"),
        _spread(t, fmt_mse(t.user_attrs.get("test_mse")), "test_mse_std"),
    )


def seeds_text(t: FrozenTrial) -> str:
    """'' for one model per trial, else 'mean of 3 seeds'."""
    n = t.user_attrs.get("repeats", 1)
    return f"mean of {n} seeds" if n > 1 else ""


def repeats_text(t: FrozenTrial) -> str:
    """'' for one model per trial, else ' (mean of 3 seeds)'."""
    return f" ({seeds_text(t)})" if seeds_text(t) else ""
