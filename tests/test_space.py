from __future__ import annotations

import optuna
import pytest

from study.config import SearchSpace, TrainConfig
from study.trial.space import grid, suggest


def test_suggest_maps_params_onto_the_train_config():
    trial = optuna.trial.FixedTrial({"depth": 3, "width": 32, "lr": 1e-3, "activation": "gelu"})
    cfg = suggest(trial, SearchSpace(), TrainConfig(max_epochs=11), seed=42)
    assert (cfg.depth, cfg.width, cfg.lr, cfg.activation, cfg.seed, cfg.max_epochs) == (
        3,
        32,
        1e-3,
        "gelu",
        42,
        11,
    )


def test_distributions_follow_the_space():
    study = optuna.create_study()
    space = SearchSpace(
        depth=(2, 5),
        width=(8, 64),
        lr=(1e-4, 1e-2),
        activation=("tanh", "relu"),
        scheduler=("none", "cosine"),
    )
    trial = study.ask()
    cfg = suggest(trial, space, TrainConfig(), seed=0)
    d = trial.distributions
    assert d["depth"] == optuna.distributions.IntDistribution(2, 5)
    assert d["width"] == optuna.distributions.IntDistribution(8, 64, log=True)
    assert d["lr"] == optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    assert d["activation"].choices == ("tanh", "relu")
    assert d["scheduler"].choices == ("none", "cosine")
    assert cfg.scheduler == trial.params["scheduler"]


def test_per_layer_widths():
    trial = optuna.trial.FixedTrial(
        {"depth": 2, "width_0": 16, "width_1": 8, "lr": 1e-3, "activation": "tanh"}
    )
    cfg = suggest(trial, SearchSpace(per_layer_width=True), TrainConfig(), seed=0)
    assert cfg.widths == (16, 8)


def test_grid_covers_the_space():
    g = grid(
        SearchSpace(depth=(1, 3), width=(8, 100), lr=(1e-4, 3e-2), activation=("tanh", "relu"))
    )
    assert g["depth"] == [1, 2, 3]
    assert g["width"] == [8, 16, 32, 64, 100]
    assert g["lr"] == pytest.approx([1e-4, 1e-3, 1e-2, 3e-2])
    assert g["activation"] == ["tanh", "relu"]
