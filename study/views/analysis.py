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

from study import quiet
from study.quiet import experimental
from study.trial import pareto
from study.trial.data import TWO_PI, scale_inputs
from study.trial.objectives import is_multi

EVALUATORS = ("ped-anova", "fanova")
MIN_TRIALS_FOR_IMPORTANCE = 5  # complete trials; below this importances are noise (or fail)


class Fit(NamedTuple):
    x: np.ndarray  # (N,) raw x in [0, 2*pi)
    target: np.ndarray  # sin(x)
    prediction: np.ndarray  # the network's output
    residual: np.ndarray  # prediction - target
    mse: float


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


def objective_names(study: optuna.Study) -> list[str]:
    """The study's values by name: val_mse, and n_params in a study of two objectives."""
    return list(study.metric_names or ["val_mse"] * len(study.directions))


def target(study: optuna.Study, objective: int = 0) -> dict:
    """Keyword arguments that make Optuna's importances and plots read one objective: none for
    a study of one (its value), `target` for a study of two (which needs one named)."""
    if not is_multi(study):
        return {}
    return {
        "target": lambda t: t.values[objective],
        "target_name": objective_names(study)[objective],
    }


def importances(
    study: optuna.Study, evaluator: str, seed: int = 0, objective: int = 0
) -> dict[str, float]:
    """Normalised importances (sum 1), largest first, for one of the study's objectives."""
    kw = target(study, objective)
    kw.pop("target_name", None)
    with quiet.importances():
        return optuna.importance.get_param_importances(
            study, evaluator=make_evaluator(evaluator, seed), normalize=True, **kw
        )


def top_trials(study: optuna.Study, k: int = 10) -> list[FrozenTrial]:
    """The complete trials of lowest validation MSE (the first value, with two objectives)."""
    return sorted(complete_trials(study), key=lambda t: t.values[0])[:k]


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The complete trial of lowest validation MSE, in a study of one objective (Optuna's own
    query) or two (where Optuna's best_trial refuses: a front has no one best)."""
    if not is_multi(study):
        try:
            return study.best_trial
        except ValueError:  # no complete trial yet
            return None
    top = top_trials(study, 1)
    return top[0] if top else None


def front(study: optuna.Study) -> list[FrozenTrial]:
    """A study of two objectives: its complete trials on the Pareto front, smallest first."""
    return pareto.front_trials(complete_trials(study)) if is_multi(study) else []


# test MSE levels of the "smallest network reaching ..." table
LEVELS = (1e-4, 1e-5, 1e-6, 1e-7)


def smallest_reaching(
    study: optuna.Study, levels: tuple[float, ...] = LEVELS
) -> list[tuple[float, FrozenTrial | None]]:
    """For each test MSE level, the complete trial with the fewest parameters whose test MSE
    (at its best validation epoch) is at most that level; None where no trial reaches it."""
    done = [
        t
        for t in complete_trials(study)
        if isinstance(t.user_attrs.get("test_mse"), (int, float))
        and isinstance(t.user_attrs.get("n_params"), int)
    ]
    out = []
    for level in levels:
        reach = [t for t in done if t.user_attrs["test_mse"] <= level]
        key = lambda t: (t.user_attrs["n_params"], t.user_attrs["test_mse"])  # noqa: E731
        out.append((level, min(reach, key=key) if reach else None))
    return out


def front_rows(trials: list[FrozenTrial]) -> list[list[str]]:
    """One row per front trial: number, n_params, val MSE, test MSE, params."""
    return [
        [
            f"#{t.number}",
            str(t.user_attrs.get("n_params", int(t.values[1]))),
            *mse_texts(t),
            params_text(t.params),
        ]
        for t in trials
    ]


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
        _spread(t, fmt_mse(t.values[0] if t.values else None), "val_mse_std"),
        _spread(t, fmt_mse(t.user_attrs.get("test_mse")), "test_mse_std"),
    )


def seeds_text(t: FrozenTrial) -> str:
    """'' for one model per trial, else 'mean of 3 seeds'."""
    n = t.user_attrs.get("repeats", 1)
    return f"mean of {n} seeds" if n > 1 else ""


def repeats_text(t: FrozenTrial) -> str:
    """'' for one model per trial, else ' (mean of 3 seeds)'."""
    return f" ({seeds_text(t)})" if seeds_text(t) else ""
