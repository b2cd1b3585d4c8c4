"""suggest(trial, space, base) -> TrainConfig: the one place Optuna meets the model.

Parameter names are stable (they are the study's columns in the dashboard and the plots):
depth, width (or width_0..width_{depth-1} with per_layer_width), lr, activation, and scheduler /
optimizer when the space searches them. A range with equal bounds is still suggested (Optuna
records it as a fixed value), so every trial carries every parameter.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import optuna

from study.config import SearchSpace, TrainConfig


def suggest(
    trial: optuna.Trial, space: SearchSpace, base: TrainConfig, *, seed: int
) -> TrainConfig:
    depth = trial.suggest_int("depth", *space.depth)
    if space.per_layer_width:
        width: int | tuple[int, ...] = tuple(
            trial.suggest_int(f"width_{i}", *space.width, log=True) for i in range(depth)
        )
    else:
        width = trial.suggest_int("width", *space.width, log=True)
    lr = trial.suggest_float("lr", *space.lr, log=True)
    activation = trial.suggest_categorical("activation", list(space.activation))
    chosen: dict[str, Any] = {}
    if space.scheduler is not None:
        chosen["scheduler"] = trial.suggest_categorical("scheduler", list(space.scheduler))
    if space.optimizer is not None:
        chosen["optimizer"] = trial.suggest_categorical("optimizer", list(space.optimizer))
    return replace(
        base, depth=depth, width=width, lr=lr, activation=activation, seed=seed, **chosen
    )


def grid_started(study: optuna.Study, space: SearchSpace) -> bool:
    """With the grid sampler: has every grid point been started (running or finished)?
    GridSampler itself hands out a running point again once none is left, which suits parallel
    workers without a budget but would repeat points within one."""
    size = math.prod(len(v) for v in grid(space).values())
    started = {t.system_attrs.get("grid_id") for t in study.get_trials(deepcopy=False)} - {None}
    return len(started) >= size


def grid(space: SearchSpace) -> dict[str, list[Any]]:
    """A finite grid over the space for GridSampler: every depth, widths at powers of two,
    learning rates at decades (plus each range's end points), every categorical choice."""

    def log_points(lo: float, hi: float, base: float, integer: bool) -> list[Any]:
        k0, k1 = math.ceil(math.log(lo, base) - 1e-9), math.floor(math.log(hi, base) + 1e-9)
        pts = {lo, hi, *(base**k for k in range(k0, k1 + 1))}
        pts = {int(round(p)) if integer else float(p) for p in pts if lo <= p <= hi}
        return sorted(pts)

    g: dict[str, list[Any]] = {
        "depth": list(range(space.depth[0], space.depth[1] + 1)),
        "width": log_points(*space.width, 2, True),
        "lr": log_points(*space.lr, 10, False),
        "activation": list(space.activation),
    }
    if space.scheduler is not None:
        g["scheduler"] = list(space.scheduler)
    if space.optimizer is not None:
        g["optimizer"] = list(space.optimizer)
    return g


def param_set(params: dict[str, Any], distributions: dict) -> frozenset:
    """What "the same parameter set" means: (name, Optuna's internal value) pairs."""
    return frozenset((name, distributions[name].to_internal_repr(v)) for name, v in params.items())
