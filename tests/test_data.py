from __future__ import annotations

import math

import torch

from study.config import DataConfig
from study.trial.data import grid_points, make_data, scale_inputs


def _raw(x: torch.Tensor) -> torch.Tensor:
    return (x.double() + 1.0) * math.pi


def test_shapes_range_and_targets():
    d = make_data(DataConfig(n_train=300, n_val=50, n_test=400))
    assert d.x_train.shape == (300, 1) and d.y_train.shape == (300, 1)
    assert d.x_val.shape == (50, 1) and d.x_test.shape == (400, 1)
    for x, y in ((d.x_train, d.y_train), (d.x_val, d.y_val), (d.x_test, d.y_test)):
        assert x.dtype == torch.float32
        assert x.min() >= -1.0 and x.max() < 1.0
        torch.testing.assert_close(y.double(), torch.sin(_raw(x)), atol=2e-6, rtol=0)


def test_same_seed_same_sets_other_seed_other_sets():
    a, b = make_data(DataConfig(seed=3)), make_data(DataConfig(seed=3))
    c = make_data(DataConfig(seed=4))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.x_val, b.x_val)
    assert not torch.equal(a.x_train, c.x_train)
    assert torch.equal(a.x_test, c.x_test)  # the test grid does not depend on the seed


def test_test_set_is_dense_uniform_and_apart_from_grid_sampled_training():
    g = grid_points(100)
    steps = g[1:] - g[:-1]
    torch.testing.assert_close(steps, torch.full_like(steps, 2 * math.pi / 100))
    d = make_data(DataConfig(n_train=100, n_test=100, sampling="grid"))
    assert torch.cdist(d.x_train, d.x_test).min() > 1e-3  # half a step apart


def test_noise_only_on_train_and_validation():
    clean, noisy = make_data(DataConfig(noise=0.0)), make_data(DataConfig(noise=0.1))
    resid = (noisy.y_train - torch.sin(_raw(noisy.x_train)).float()).std().item()
    assert 0.08 < resid < 0.12
    torch.testing.assert_close(noisy.y_test, clean.y_test)


def test_scale_inputs_maps_interval_ends():
    x = torch.tensor([0.0, math.pi, 2 * math.pi])
    torch.testing.assert_close(scale_inputs(x), torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(scale_inputs(x, "raw"), x)


def test_raw_inputs_are_x_itself_and_the_rest_unchanged():
    unit, raw = make_data(DataConfig()), make_data(DataConfig(input_scaling="raw"))
    torch.testing.assert_close(raw.x_train, _raw(unit.x_train).float())
    torch.testing.assert_close(raw.x_test, _raw(unit.x_test).float())
    torch.testing.assert_close(raw.y_train, unit.y_train)
    assert 0.0 <= raw.x_train.min().item() and raw.x_train.max().item() < 2 * math.pi
