"""The comparisons as data: each factor's cells, what is held fixed (BASE, SETUPS), the
report's own numbers beside them, and what a cell trains (cell_config, cell_data)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from study.config import DataConfig, TrainConfig
from study.trial.course import TEST_MSE as REPORT_TEST_MSE

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


def never_acts(cfg: TrainConfig) -> str:
    """Words for a schedule that cannot change the learning rate within the cell's epochs, or ''.
    A step schedule decays after `step_size` epochs: at step_size >= max_epochs it never does, and
    the cell is its constant-lr twin."""
    if cfg.scheduler == "step" and cfg.step_size >= cfg.max_epochs:
        return (
            f"its schedule (lr x{cfg.gamma:g} every {cfg.step_size} epochs) never acts within "
            f"{cfg.max_epochs} epochs: give --max-epochs above {cfg.step_size} for it to"
        )
    return ""


def cell_config(
    factor: Factor, cell: str, seed: int, epochs: int, setup: Setup = SETUPS["default"]
) -> TrainConfig:
    fields = {k: v for k, v in factor.cells[cell].items() if k != "data"}
    return replace(setup.train, max_epochs=epochs, seed=seed, **fields)


def cell_data(factor: Factor, cell: str, setup: Setup = SETUPS["default"]) -> DataConfig:
    return replace(setup.data, **factor.cells[cell].get("data", {}))


def study_name(name: str, epochs: int, seeds: int, setup: str = "default") -> str:
    return f"compare-{name}-e{epochs}-s{seeds}" + ("" if setup == "default" else f"-{setup}")
