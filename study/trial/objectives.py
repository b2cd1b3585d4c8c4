"""What a trial's values are, and how the engines report to and prune a study of one or two.

One objective (the default): the value is the trial's best validation MSE, reported each epoch
with Optuna's `Trial.report` and pruned with `should_prune`, as any Optuna objective. Two
(`--objectives val_mse,n_params`): the values are (best validation MSE, parameter count), both
minimised; Optuna refuses `report` and `should_prune` for such a study, so each epoch's MSE goes
to storage as an intermediate value directly (the same rows: optuna-dashboard shows the curve)
and the pruner (study/pareto.py) is asked directly, as `should_prune` would.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import optuna

from study.config import StudyConfig


def multi(cfg: StudyConfig) -> bool:
    return len(cfg.objectives) > 1


def directions(cfg: StudyConfig) -> list[str]:
    return ["minimize"] * len(cfg.objectives)


def count_params(widths: Sequence[int]) -> int:
    """Weights and biases of 1 -> widths... -> 1 (model.build_mlp), without building it."""
    sizes = [1, *widths, 1]
    return sum(a * b + b for a, b in zip(sizes, sizes[1:], strict=False))


def values(cfg: StudyConfig, mse: float, n_params: int) -> list[float]:
    """A complete trial's values, in the study's order."""
    return [mse, float(n_params)] if multi(cfg) else [mse]


def report(trial: optuna.Trial, value: float, step: int) -> None:
    """Trial.report, which a study of two objectives refuses: there, straight to storage."""
    if len(trial.study.directions) == 1:
        trial.report(value, step)
    else:
        trial.study._storage.set_trial_intermediate_value(trial._trial_id, step, float(value))


def should_prune(trial: optuna.Trial) -> bool:
    """Trial.should_prune, which a study of two objectives refuses: there, its pruner asked
    with the trial as stored, as should_prune itself does."""
    if len(trial.study.directions) == 1:
        return trial.should_prune()
    study = trial.study
    return study.pruner.prune(study, copy.deepcopy(study._storage.get_trial(trial._trial_id)))


def is_multi(study: optuna.Study) -> bool:
    return len(study.directions) > 1


def mse(t: optuna.trial.FrozenTrial) -> float | None:
    """A finished trial's validation MSE (its first value), in a study of one or two
    objectives (FrozenTrial.value refuses the latter)."""
    return None if t.values is None else t.values[0]
