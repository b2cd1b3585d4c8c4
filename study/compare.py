"""`sinstudy compare FACTOR`: the course report's comparisons, redone with repeats.

Each factor is a small grid study (`compare-<factor>-e<epochs>-s<seeds>` in the same storage):
one trial per cell of the factor, with `seeds` repeats (different weights and batch order; the
same seeds in every cell), everything else held at BASE. All cells and seeds train at once in
the batched engine (enqueued trials, no pruning), so curves land in TensorBoard and the
dashboard like any trial's, and an interrupted comparison resumes with the cells it lacks.
The table gives mean +- std over seeds; each verdict states its test and what it found.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from . import config, interrupt
from .batched.engine import run_batched
from .budget import Budget
from .config import ConfigError, DataConfig, TrainConfig
from .course import TEST_MSE as REPORT_TEST_MSE
from .opening import name_metric, open_study_storage

# Held fixed unless a factor varies it: the report trained with ReLU and no schedule; it named
# no optimizer (Adam here) and no widths (32 here).
BASE = TrainConfig(
    depth=2,
    width=32,
    activation="relu",
    lr=1e-3,
    optimizer="adam",
    scheduler="none",
    max_epochs=1000,
)


@dataclass(frozen=True)
class Setup:
    """What a comparison holds fixed: the training defaults and the data."""

    train: TrainConfig
    data: DataConfig
    about: str


SETUPS = {
    "default": Setup(BASE, DataConfig(), "data as `sinstudy run`"),
    # The report's setting as measured (`sinstudy compare report`; docs/results.md): plain SGD
    # whose rate decays, on raw x over 4,800 training points (75 steps per epoch at batch 64,
    # its "30k steps by epoch 400").
    "report": Setup(
        replace(
            BASE,
            optimizer="sgd",
            momentum=0.0,
            lr=3e-3,
            scheduler="step",
            step_size=100,
            gamma=0.5,
        ),
        DataConfig(n_train=4800, input_scaling="raw"),
        "raw x, 4,800 training points (the report's setting, as measured)",
    ),
}


@dataclass(frozen=True)
class Factor:
    # cell name -> TrainConfig fields it changes (and "data": DataConfig fields)
    cells: dict[str, dict[str, Any]]
    report: dict[str, str]  # cell name -> what the report found for it
    question: str


def _step(epochs: int) -> dict[str, Any]:
    return {"scheduler": "step", "step_size": max(1, epochs // 4), "gamma": 0.3}


NETS = {"shallow": {"depth": 1}, "deep": {"depth": 4}}  # at the base width, as `compare depth`
# Candidate causes of the gap between the report's numbers and sinstudy's: each a setting
# the report leaves open (optimizer, learning rate, input scaling, training-set size).
_RAW, _RAW_4800 = {"input_scaling": "raw"}, {"input_scaling": "raw", "n_train": 4800}
_SGD = {"optimizer": "sgd", "momentum": 0.0}
_HALVED = {"scheduler": "step", "step_size": 100, "gamma": 0.5}
HYPOTHESES: dict[str, dict[str, Any]] = {
    "sinstudy's setting": {},
    "raw x": {"data": _RAW},
    "raw x, 4800 points": {"data": _RAW_4800},
    "SGD 1e-3": {**_SGD, "lr": 1e-3},
    "raw x, SGD 1e-3": {**_SGD, "lr": 1e-3, "data": _RAW},
    "raw x, 4800 points, SGD 1e-3": {**_SGD, "lr": 1e-3, "data": _RAW_4800},
    "raw x, 4800 points, SGD 1e-4": {**_SGD, "lr": 1e-4, "data": _RAW_4800},
    "raw x, 4800 points, SGD 1e-2": {**_SGD, "lr": 1e-2, "data": _RAW_4800},
    "raw x, 4800 points, SGD 3e-3": {**_SGD, "lr": 3e-3, "data": _RAW_4800},
    # "converged after about 400 epochs": a learning rate that decays by then
    "raw x, 4800 points, SGD 1e-2 halved every 100 epochs": {
        **_SGD,
        **_HALVED,
        "lr": 1e-2,
        "data": _RAW_4800,
    },
    "raw x, 4800 points, SGD 3e-3 halved every 100 epochs": {
        **_SGD,
        **_HALVED,
        "lr": 3e-3,
        "data": _RAW_4800,
    },
    "raw x, 4800 points, SGD 1e-2 x0.1 every 250 epochs": {
        **_SGD,
        "scheduler": "step",
        "step_size": 250,
        "gamma": 0.1,
        "lr": 1e-2,
        "data": _RAW_4800,
    },
    "raw x, 4800 points, Adam 1e-4": {"lr": 1e-4, "data": _RAW_4800},
    # the report's networks are unnamed: its shallow one wider (1 x 128), its deep one 4 x 32
    "raw x, 4800 points, SGD 3e-3 halved every 100 epochs, shallow 1 x 128": {
        **_SGD,
        **_HALVED,
        "lr": 3e-3,
        "data": _RAW_4800,
    },
}
# Which networks each hypothesis trains as "shallow" and "deep" (default: NETS).
NETS_OF = {
    "raw x, 4800 points, SGD 3e-3 halved every 100 epochs, shallow 1 x 128": {
        "shallow": {"depth": 1, "width": 128},
        "deep": {"depth": 4},
    }
}

FACTORS: dict[str, Callable[[int], Factor]] = {
    "depth": lambda e: Factor(
        {
            "shallow (1 layer)": {"depth": 1},
            "2 layers": {"depth": 2},
            "deep (4 layers)": {"depth": 4},
        },
        {
            "shallow (1 layer)": f"test MSE {REPORT_TEST_MSE['shallow']:.3e}",
            "deep (4 layers)": f"test MSE {REPORT_TEST_MSE['deep']:.3e}",
        },
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
    "report": lambda e: Factor(
        {
            f"{h} / {net}": {**cell, **arch}
            for h, cell in HYPOTHESES.items()
            for net, arch in NETS_OF.get(h, NETS).items()
        },
        {
            f"{h} / {net}": f"test MSE {REPORT_TEST_MSE[net]:.3e}"
            for h in HYPOTHESES
            for net in NETS
        },
        f"which setting gives the report's test MSE (deep {REPORT_TEST_MSE['deep']:.1e}, shallow "
        f"{REPORT_TEST_MSE['shallow']:.1e}) within 2x?",
    ),
    "activation": lambda e: Factor(
        {
            "relu": {},
            "tanh": {"activation": "tanh"},
            "none (identity)": {"activation": "identity"},
        },
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
    settled: int | None = None  # first epoch of the mean validation curve within 2x of its best


def settled(curve: dict[int, float]) -> int | None:
    """The first epoch whose (mean) validation MSE is within 2x of the curve's best: where a
    loss plot on a log scale stops visibly falling, what the report calls converged."""
    finite = {e: v for e, v in curve.items() if math.isfinite(v)}
    if not finite:
        return None
    best = min(finite.values())
    return min(e for e, v in finite.items() if v <= 2 * best)


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell_config(
    factor: Factor, cell: str, seed: int, epochs: int, setup: Setup = SETUPS["default"]
) -> TrainConfig:
    fields = {k: v for k, v in factor.cells[cell].items() if k != "data"}
    return replace(setup.train, max_epochs=epochs, seed=seed, **fields)


def cell_data(factor: Factor, cell: str, setup: Setup = SETUPS["default"]) -> DataConfig:
    return replace(setup.data, **factor.cells[cell].get("data", {}))


def study_name(name: str, epochs: int, seeds: int, setup: str = "default") -> str:
    return f"compare-{name}-e{epochs}-s{seeds}" + ("" if setup == "default" else f"-{setup}")


def run(
    name: str,
    url: str,
    *,
    epochs: int,
    seeds: int,
    device: str,
    log_dir: str,
    artifact_dir: str,
    setup: str = "default",
    progress: Callable[[int], None] | None = None,
) -> list[CellStats]:
    """Train the missing cells of one factor and return its statistics. A cell is one trial of a
    grid study with `seeds` repeats (seeds 0..seeds-1, the same in every cell, so the cells differ
    only in what they vary); the cells x seeds of one data set train at once in the batched
    engine (one engine run per data set), no pruning. `progress(n)`: n cells finished, first
    called once every check has passed."""
    if name not in FACTORS:
        raise ConfigError(f"unknown comparison {name!r}; choose one of: {', '.join(FACTORS)}")
    if setup not in SETUPS:
        raise ConfigError(f"unknown setup {setup!r}; choose one of: {', '.join(SETUPS)}")
    factor, fixed = FACTORS[name](epochs), SETUPS[setup]
    by_data: dict[DataConfig, list[str]] = {}
    for cell in factor.cells:
        by_data.setdefault(cell_data(factor, cell, fixed), []).append(cell)
    cfgs = {
        data: config.build(
            {"data": asdict(data)},
            study=study_name(name, epochs, seeds, setup),
            storage=url,
            max_epochs=epochs,
            pruner="none",
            repeats=seeds,
            device=device,
            engine="batched",
            log_dir=log_dir,
            artifact_dir=artifact_dir,
            slots=len(cells) * seeds,
        )
        for data, cells in by_data.items()
    }
    storage = open_study_storage(next(iter(cfgs.values())))
    study = optuna.create_study(
        study_name=study_name(name, epochs, seeds, setup),
        storage=storage,
        load_if_exists=True,
        pruner=optuna.pruners.NopPruner(),
    )
    trials = study.get_trials(deepcopy=False)
    stored = next((t.distributions["cell"] for t in trials if "cell" in t.distributions), None)
    if stored is not None and list(stored.choices) != list(factor.cells):
        raise ConfigError(
            f"study {study.study_name!r} in this storage holds other cells than `compare {name}` "
            "has now (an older sinstudy); delete it (optuna delete-study) or use another --storage"
        )
    done = {
        t.params.get("cell") for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    }
    queued = {t.params.get("cell") for t in trials if t.state == TrialState.WAITING}
    name_metric(study)
    finished = [len(done & set(factor.cells))]
    if progress:
        progress(finished[0])  # everything checked: training starts

    def on_trial(number: int, state: TrialState, value: float | None) -> None:
        finished[0] += 1
        if progress:
            progress(finished[0])

    Path(artifact_dir).mkdir(parents=True, exist_ok=True)
    # One data set at a time, in a fixed order: queued trials (from an interrupted run) always
    # belong to the first data set with cells left, so each engine takes only its own.
    for data, cells in by_data.items():
        todo = [c for c in cells if c not in done]
        if not todo:
            continue
        for cell in todo:
            if cell not in queued:
                study.enqueue_trial({"cell": cell})

        def configure(trial: optuna.Trial, first_seed: int, cells=cells) -> list[TrainConfig]:
            cell = trial.suggest_categorical("cell", list(factor.cells))
            if cell not in cells:
                raise RuntimeError(f"queued cell {cell!r} belongs to another data set")
            return [cell_config(factor, cell, seed, epochs, fixed) for seed in range(seeds)]

        with interrupt.handle_signals():
            run_batched(
                cfgs[data],
                Budget(len(todo), None),
                seed=0,
                device=torch.device(device),
                on_trial=on_trial,
                storage=storage,
                configure=configure,
                publish=False,  # the note is the comparison's table (cli), not a study summary
            )
        if interrupt.requested():
            raise KeyboardInterrupt
    if "base" not in study.user_attrs:
        study.set_user_attr(
            "base",
            json.dumps(
                {
                    "train": asdict(replace(fixed.train, max_epochs=epochs)),
                    "data": asdict(fixed.data),
                }
            ),
        )
    return stats(study, factor, seeds)


def stats(study: optuna.Study, factor: Factor, seeds: int) -> list[CellStats]:
    """Mean +- std over each cell's seeds, from the per-seed values its trial stores."""
    rows = []
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    for cell in factor.cells:
        t = next(
            (
                t
                for t in trials
                if t.params.get("cell") == cell and "test_mse_per_seed" in t.user_attrs
            ),
            None,
        )

        def attr(key: str, t=t) -> tuple[float, float]:
            return _mean_std([float(v) for v in t.user_attrs[f"{key}_per_seed"]] if t else [])

        rows.append(
            CellStats(
                cell,
                len(t.user_attrs["seeds"]) if t else 0,
                attr("test_mse"),
                attr("final_test_mse"),
                attr("val_mse"),
                attr("final_val_mse"),
                factor.report.get(cell, ""),
                settled(t.intermediate_values) if t else None,
            )
        )
    return rows


def _lower(a: tuple[float, float], b: tuple[float, float]) -> str:
    """For mean a < mean b: does the gap exceed one standard deviation of each (seed spread)?"""
    clear = a[0] + a[1] < b[0] - b[1]
    return "clearly" if clear else "within the seed spread"


def verdicts(name: str, rows: list[CellStats]) -> list[str]:
    r = {row.cell: row for row in rows}
    if name == "depth":
        s, d = r["shallow (1 layer)"], r["deep (4 layers)"]
        agree = d.test[0] < s.test[0]
        return [
            f"deep vs shallow: test MSE {d.test[0]:.2e} vs {s.test[0]:.2e}: the deeper network is "
            f"{'better' if agree else 'not better'} "
            f"({_lower(d.test, s.test) if agree else _lower(s.test, d.test)}); "
            f"report: deep better ({REPORT_TEST_MSE['deep']:.1e} vs "
            f"{REPORT_TEST_MSE['shallow']:.1e}) -> {'agrees' if agree else 'disagrees'}"
        ]
    if name == "width":
        n, w = r["narrow (8)"], r["wide (128)"]
        agree = w.test[0] < n.test[0]
        return [
            f"wide vs narrow: test MSE {w.test[0]:.2e} vs {n.test[0]:.2e}: the wider network is "
            f"{'better' if agree else 'not better'} "
            f"({_lower(w.test, n.test) if agree else _lower(n.test, w.test)})"
        ]
    if name == "lr":
        lo, hi = r["lr 1e-4"], r["lr 1e-2"]
        rise_hi, rise_lo = hi.final_val[0] / hi.val[0], lo.final_val[0] / lo.val[0]
        rise = "the rise near the end is there" if rise_hi > 1.5 * rise_lo else "no clear rise"
        return [
            f"lr 1e-2 ends at {rise_hi:.1f}x its best validation MSE, lr 1e-4 at {rise_lo:.1f}x: "
            f"{rise} with 1e-2 "
            "(report: 1e-2 rose again)",
            f"final-weights test MSE: lr 1e-2 {hi.final_test[0]:.2e} vs lr 1e-4 "
            f"{lo.final_test[0]:.2e} -> "
            f"{'1e-4' if lo.final_test[0] < hi.final_test[0] else '1e-2'} is better at the end of "
            f"training",
        ]
    if name == "scheduler":
        none = r["no schedule"]
        out = []
        for cell in ("step schedule", "cosine schedule"):
            c = r[cell]
            test_worse, val_better = (
                c.final_test[0] > none.final_test[0],
                c.final_val[0] < none.final_val[0],
            )
            out.append(
                f"{cell} vs none (final weights): test {c.final_test[0]:.2e} vs "
                f"{none.final_test[0]:.2e} "
                f"({'worse' if test_worse else 'better'}), validation {c.final_val[0]:.2e} vs "
                f"{none.final_val[0]:.2e} "
                f"({'better' if val_better else 'worse'}) -> report's finding (worse on test, "
                f"better on validation) "
                f"{'reproduced' if test_worse and val_better else 'not reproduced'}"
            )
        return out
    if name == "report":
        out = []
        for h in HYPOTHESES:
            got = {net: r[f"{h} / {net}"] for net in NETS}
            ratios = {net: got[net].test[0] / REPORT_TEST_MSE[net] for net in NETS}
            close = all(0.5 <= x <= 2.0 for x in ratios.values())
            out.append(
                f"{h}: deep {got['deep'].test[0]:.2e} ({ratios['deep']:.2g}x the report's), "
                f"shallow "
                f"{got['shallow'].test[0]:.2e} ({ratios['shallow']:.2g}x), settled by epoch "
                f"{got['deep'].settled} / {got['shallow'].settled} -> "
                f"{'reproduces the report within 2x' if close else 'does not reproduce it'}"
            )
        return out
    act, lin = r["relu"], r["none (identity)"]
    fits = act.test[0] < 1e-2 and lin.test[0] > 0.1
    found = (
        "only the network with an activation fits sin(x); without one it is a straight line"
        if fits
        else "unexpected: see the table"
    )
    return [
        f"relu {act.test[0]:.2e} vs no activation {lin.test[0]:.2e} test MSE: {found} "
        "(report: only with the activation did it converge)"
    ]


def describe_base(epochs: int, setup: str = "default") -> str:
    fixed = SETUPS[setup]
    b = replace(fixed.train, max_epochs=epochs)
    opt = f"SGD (momentum {b.momentum:g})" if b.optimizer == "sgd" else b.optimizer
    schedule = {
        "none": "no schedule",
        "step": f"lr x{b.gamma:g} every {b.step_size} epochs",
        "cosine": "cosine schedule",
        "exponential": f"lr x{b.gamma:g} per epoch",
    }[b.scheduler]
    return (
        f"held fixed unless the cell varies it: depth {b.depth}, width {b.width}, {b.activation}, "
        f"{opt} lr {b.lr:g}, {schedule}, batch {b.batch_size}, {epochs} epochs; {fixed.about}"
    )


def table(rows: list[CellStats]) -> str:
    def ms(v: tuple[float, float]) -> str:
        return f"{v[0]:.2e} +- {v[1]:.1e}"

    lines = [
        "| cell | seeds | test MSE (best epoch) | test MSE (final) | val MSE (best) | val MSE "
        "(final) | settled | report |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.cell} | {r.n} | {ms(r.test)} | {ms(r.final_test)} | {ms(r.val)} | "
        f"{ms(r.final_val)} | {r.settled or ''} "
        f"| {r.report} |"
        for r in rows
    ]
    return "\n".join(lines)
