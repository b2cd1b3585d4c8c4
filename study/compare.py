"""`sinstudy compare FACTOR`: the course report's comparisons, redone with repeats.

Each factor is a small grid study (`compare-<factor>-e<epochs>` in the same storage): every cell
of the factor, `seeds` runs per cell (different weights and batch order), everything else held
at BASE. Cells run through Optuna (enqueued trials, no pruning), so curves land in TensorBoard
and the dashboard like any trial, and an interrupted comparison resumes with the missing runs.
The table gives mean +- std over seeds; each verdict states its test and what it found.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from .config import ConfigError, DataConfig, TrainConfig
from .data import make_data
from .trial_attrs import result_attrs
from .tracking import TrialLogger
from .train import train

# Held fixed unless a factor varies it: the report trained with ReLU and no schedule; it named
# no optimizer (Adam here) and no widths (32 here).
BASE = TrainConfig(depth=2, width=32, activation="relu", lr=1e-3, optimizer="adam", scheduler="none", max_epochs=1000)


@dataclass(frozen=True)
class Factor:
    cells: dict[str, dict[str, Any]]  # cell name -> TrainConfig fields it changes
    report: dict[str, str]  # cell name -> what the report found for it
    question: str


def _step(epochs: int) -> dict[str, Any]:
    return {"scheduler": "step", "step_size": max(1, epochs // 4), "gamma": 0.3}


FACTORS: dict[str, Callable[[int], Factor]] = {
    "depth": lambda e: Factor(
        {"shallow (1 layer)": {"depth": 1}, "2 layers": {"depth": 2}, "deep (4 layers)": {"depth": 4}},
        {"shallow (1 layer)": "test MSE 0.0050585", "deep (4 layers)": "test MSE 0.0014184"},
        "does the deeper network fit better (lower test MSE)?",
    ),
    "width": lambda e: Factor(
        {"narrow (8)": {"width": 8}, "32": {"width": 32}, "wide (128)": {"width": 128}},
        {},
        "does the wider network fit better (lower test MSE)?",
    ),
    "lr": lambda e: Factor(
        {"lr 1e-4": {"lr": 1e-4}, "lr 1e-2": {"lr": 1e-2}},
        {"lr 1e-4": "correct loss curve", "lr 1e-2": "MSE rose again near the end"},
        "does constant lr 1e-2 end above its best (the rise the report saw) while 1e-4 does not?",
    ),
    "scheduler": lambda e: Factor(
        {"no schedule": {}, "step schedule": _step(e), "cosine schedule": {"scheduler": "cosine"}},
        {"no schedule": "", "step schedule": "larger test MSE, smaller validation MSE"},
        "is a schedule worse on test but better on validation, as the report found?",
    ),
    "activation": lambda e: Factor(
        {"relu": {}, "tanh": {"activation": "tanh"}, "none (identity)": {"activation": "identity"}},
        {"relu": "converged and fit", "none (identity)": "did not converge or fit"},
        "does the network fit sin(x) only with an activation?",
    ),
}


@dataclass(frozen=True)
class CellStats:
    cell: str
    n: int
    test: tuple[float, float]  # mean, std of test MSE on the best epoch's weights
    final_test: tuple[float, float]  # on the last epoch's weights
    val: tuple[float, float]  # best validation MSE
    final_val: tuple[float, float]
    report: str


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell_config(factor: Factor, cell: str, seed: int, epochs: int) -> TrainConfig:
    return replace(BASE, max_epochs=epochs, seed=seed, **factor.cells[cell])


def run(name: str, storage: optuna.storages.BaseStorage, *, epochs: int, seeds: int, device: str,
        log_dir: str, data_cfg: DataConfig = DataConfig(), progress: Callable[[FrozenTrial], None] | None = None) -> list[CellStats]:
    """Run the missing (cell, seed) runs of one factor and return its statistics."""
    if name not in FACTORS:
        raise ConfigError(f"unknown comparison {name!r}; choose one of: {', '.join(FACTORS)}")
    factor = FACTORS[name](epochs)
    study_name = f"compare-{name}-e{epochs}"
    study = optuna.create_study(study_name=study_name, storage=storage, load_if_exists=True, pruner=optuna.pruners.NopPruner())
    done = {(t.params["cell"], t.params["seed"]) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))}
    missing = [(c, s) for c in factor.cells for s in range(seeds) if (c, s) not in done]
    for cell, seed in missing:
        study.enqueue_trial({"cell": cell, "seed": seed})
    data = make_data(data_cfg, device)

    def objective(trial: optuna.Trial) -> float:
        cell = trial.suggest_categorical("cell", list(factor.cells))
        seed = trial.suggest_int("seed", 0, max(seeds - 1, 0))
        cfg = cell_config(factor, cell, seed, epochs)
        logger = TrialLogger(log_dir, study_name, trial.number)
        result = train(cfg, data, on_epoch=logger.log_epoch)
        logger.close({"cell": cell, "seed": seed, **{k: str(v) for k, v in factor.cells[cell].items()}},
                     {"val_mse": result.best_val_mse, "test_mse": result.test_mse})
        for k, v in result_attrs(result, cfg).items():
            trial.set_user_attr(k, v)
        if result.diverged:
            trial.set_user_attr("pruned_reason", result.diverged)
            raise optuna.TrialPruned(result.diverged)
        return result.best_val_mse

    callbacks = [lambda s, t: progress(t)] if progress else []
    study.optimize(objective, n_trials=len(missing), callbacks=callbacks)
    if "base" not in study.user_attrs:
        study.set_user_attr("base", json.dumps(asdict(replace(BASE, max_epochs=epochs))))
    return stats(study, factor, seeds)


def stats(study: optuna.Study, factor: Factor, seeds: int) -> list[CellStats]:
    rows = []
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    for cell in factor.cells:
        ts = [t for t in trials if t.params.get("cell") == cell and t.params.get("seed", 0) < seeds]
        def attr(key: str) -> tuple[float, float]:
            return _mean_std([float(t.user_attrs.get(key, math.inf)) for t in ts])

        best_val = _mean_std([t.value if t.state == TrialState.COMPLETE else math.inf for t in ts])
        rows.append(CellStats(cell, len(ts), attr("test_mse"), attr("final_test_mse"), best_val,
                              attr("final_val_mse"), factor.report.get(cell, "")))
    return rows


def _lower(a: tuple[float, float], b: tuple[float, float]) -> str:
    """For mean a < mean b: does the gap exceed one standard deviation of each (the seed spread)?"""
    clear = a[0] + a[1] < b[0] - b[1]
    return "clearly" if clear else "within the seed spread"


def verdicts(name: str, rows: list[CellStats]) -> list[str]:
    r = {row.cell: row for row in rows}
    if name == "depth":
        s, d = r["shallow (1 layer)"], r["deep (4 layers)"]
        agree = d.test[0] < s.test[0]
        return [f"deep vs shallow: test MSE {d.test[0]:.2e} vs {s.test[0]:.2e}: the deeper network is "
                f"{'better' if agree else 'not better'} ({_lower(d.test, s.test) if agree else _lower(s.test, d.test)}); "
                f"report: deep better (0.0014 vs 0.0051) -> {'agrees' if agree else 'disagrees'}"]
    if name == "width":
        n, w = r["narrow (8)"], r["wide (128)"]
        agree = w.test[0] < n.test[0]
        return [f"wide vs narrow: test MSE {w.test[0]:.2e} vs {n.test[0]:.2e}: the wider network is "
                f"{'better' if agree else 'not better'} ({_lower(w.test, n.test) if agree else _lower(n.test, w.test)})"]
    if name == "lr":
        lo, hi = r["lr 1e-4"], r["lr 1e-2"]
        rise_hi, rise_lo = hi.final_val[0] / hi.val[0], lo.final_val[0] / lo.val[0]
        return [
            f"lr 1e-2 ends at {rise_hi:.1f}x its best validation MSE, lr 1e-4 at {rise_lo:.1f}x: "
            f"{'the rise near the end is there with 1e-2' if rise_hi > 1.5 * rise_lo else 'no clear rise with 1e-2'} "
            "(report: 1e-2 rose again)",
            f"final-weights test MSE: lr 1e-2 {hi.final_test[0]:.2e} vs lr 1e-4 {lo.final_test[0]:.2e} -> "
            f"{'1e-4' if lo.final_test[0] < hi.final_test[0] else '1e-2'} is better at the end of training",
        ]
    if name == "scheduler":
        none = r["no schedule"]
        out = []
        for cell in ("step schedule", "cosine schedule"):
            c = r[cell]
            test_worse, val_better = c.final_test[0] > none.final_test[0], c.final_val[0] < none.final_val[0]
            out.append(
                f"{cell} vs none (final weights): test {c.final_test[0]:.2e} vs {none.final_test[0]:.2e} "
                f"({'worse' if test_worse else 'better'}), validation {c.final_val[0]:.2e} vs {none.final_val[0]:.2e} "
                f"({'better' if val_better else 'worse'}) -> report's finding (worse on test, better on validation) "
                f"{'reproduced' if test_worse and val_better else 'not reproduced'}"
            )
        return out
    act, lin = r["relu"], r["none (identity)"]
    fits = act.test[0] < 1e-2 and lin.test[0] > 0.1
    return [f"relu {act.test[0]:.2e} vs no activation {lin.test[0]:.2e} test MSE: "
            f"{'only the network with an activation fits sin(x); without one it is a straight line' if fits else 'unexpected: see the table'} "
            "(report: only with the activation did it converge)"]


def describe_base(epochs: int) -> str:
    b = replace(BASE, max_epochs=epochs)
    return (f"held fixed unless the cell varies it: depth {b.depth}, width {b.width}, {b.activation}, {b.optimizer} lr {b.lr:g}, "
            f"no schedule, batch {b.batch_size}, {epochs} epochs; data as `sinstudy run`")


def table(rows: list[CellStats]) -> str:
    def ms(v: tuple[float, float]) -> str:
        return f"{v[0]:.2e} +- {v[1]:.1e}"

    lines = ["| cell | runs | test MSE (best epoch) | test MSE (final) | val MSE (best) | val MSE (final) | report |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.cell} | {r.n} | {ms(r.test)} | {ms(r.final_test)} | {ms(r.val)} | {ms(r.final_val)} | {r.report} |" for r in rows]
    return "\n".join(lines)
