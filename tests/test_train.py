from __future__ import annotations

import math

import pytest
import torch

from study.config import DataConfig, TrainConfig
from study.trial.data import make_data
from study.trial.train import lr_at, mse, train


@pytest.fixture(scope="module")
def data():
    return make_data(DataConfig(n_train=256, n_val=64, n_test=512))


def test_training_fits_sin(data):
    cfg = TrainConfig(depth=2, width=32, activation="tanh", lr=1e-2, max_epochs=150)
    r = train(cfg, data)
    assert r.diverged is None and r.epochs == 150
    assert r.best_val_mse < 1e-3  # an untrained net is ~0.5
    assert r.test_mse < 2e-3
    assert r.n_params == (32 + 32) + (32 * 32 + 32) + (32 + 1)


def test_value_and_test_mse_describe_the_best_epoch(data):
    seen = []
    r = train(
        TrainConfig(depth=1, width=8, activation="tanh", lr=2e-2, max_epochs=15),
        data,
        on_epoch=seen.append,
    )
    assert [log.epoch for log in seen] == list(range(1, 16))
    vals = [log.val_mse for log in seen]
    assert r.best_val_mse == min(vals) and r.best_epoch == vals.index(min(vals)) + 1
    assert r.final_val_mse == vals[-1]
    # the returned model holds the best epoch's weights: recomputing gives the same numbers
    assert mse(r.model, data.x_val, data.y_val) == pytest.approx(r.best_val_mse, rel=1e-6)
    assert mse(r.model, data.x_test, data.y_test) == pytest.approx(r.test_mse, rel=1e-6)


def test_same_seed_same_numbers_other_seed_other_numbers(data):
    cfg = TrainConfig(depth=2, width=8, activation="relu", lr=1e-2, max_epochs=5, seed=7)
    a, b = train(cfg, data), train(cfg, data)
    c = train(TrainConfig(**{**cfg.__dict__, "seed": 8}), data)
    assert a.best_val_mse == b.best_val_mse and a.test_mse == b.test_mse
    assert a.best_val_mse != c.best_val_mse


def test_huge_learning_rate_diverges_without_raising(data):
    cfg = TrainConfig(
        depth=4,
        width=64,
        activation="relu",
        lr=1e6,
        optimizer="sgd",
        scheduler="none",
        max_epochs=20,
    )
    r = train(cfg, data)
    assert r.diverged is not None and "non-finite" in r.diverged
    assert r.epochs < 20


def test_on_epoch_exception_stops_training(data):
    class Stop(Exception):
        pass

    def stop_at_3(log):
        if log.epoch == 3:
            raise Stop

    with pytest.raises(Stop):
        train(TrainConfig(depth=1, width=4, max_epochs=10), data, on_epoch=stop_at_3)


@pytest.mark.parametrize("scheduler", ["none", "step", "cosine", "exponential"])
def test_schedule_matches_torch_schedulers(scheduler):
    cfg = TrainConfig(lr=0.1, scheduler=scheduler, step_size=3, gamma=0.7, max_epochs=12)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    sched = {
        "none": lambda: None,
        "step": lambda: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7),
        "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12),
        "exponential": lambda: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.7),
    }[scheduler]()
    for epoch in range(12):
        assert lr_at(cfg, epoch) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15)
        opt.step()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_each_optimizer_trains(data, optimizer):
    lr = 1e-1 if optimizer == "sgd" else 1e-2
    r = train(
        TrainConfig(
            depth=2, width=32, activation="tanh", lr=lr, optimizer=optimizer, max_epochs=60
        ),
        data,
    )
    # a straight line fits no better than ~0.19
    assert r.diverged is None and r.best_val_mse < 0.05


def test_no_activation_cannot_fit_sin(data):
    lin = train(
        TrainConfig(depth=2, width=16, activation="identity", lr=1e-2, max_epochs=30), data
    )
    # best affine fit of sin on [0, 2pi) leaves MSE ~ 0.5 - 3*(2/pi)**2 / ... ~ 0.19
    assert lin.best_val_mse > 0.1
    assert math.isfinite(lin.test_mse)
