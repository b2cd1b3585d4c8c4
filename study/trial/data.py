"""The sin(x) data set: train / validation / test on [0, 2*pi), created once on the device.

Train and validation x are drawn uniformly at random (or on a grid); the test set is a dense grid
at half-step offsets, so no test point coincides with a grid-sampled training point. Inputs are
rescaled to [-1, 1) before they reach the network (`scale_inputs`; `input_scaling = "raw"` feeds
x itself, as the course report did): raw x up to 6.28 saturates tanh and sigmoid units at
initialisation and costs every activation but ReLU an order of magnitude in final MSE. No
DataLoader: for tensors already in memory it only adds per-batch Python overhead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from study.config import DataConfig

TWO_PI = 2 * math.pi


def scale_inputs(x: torch.Tensor, scaling: str = "unit") -> torch.Tensor:
    """x in [0, 2*pi) as the network sees it: unit maps it to [-1, 1); raw feeds x itself."""
    return x / math.pi - 1.0 if scaling == "unit" else x


@dataclass(frozen=True)
class SinData:
    """Network-ready tensors, each (N, 1), on one device. x_* are scaled inputs (scale_inputs)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.x_train.device


def _draw(n: int, sampling: str, g: torch.Generator) -> torch.Tensor:
    if sampling == "grid":
        return torch.linspace(0.0, TWO_PI, n + 1, dtype=torch.float64)[:-1]
    return torch.rand(n, generator=g, dtype=torch.float64) * TWO_PI


def grid_points(n: int) -> torch.Tensor:
    """n points at the centres of n equal cells of [0, 2*pi) (float64, raw x)."""
    return (torch.arange(n, dtype=torch.float64) + 0.5) * (TWO_PI / n)


def make_data(cfg: DataConfig, device: torch.device | str = "cpu") -> SinData:
    """Draw the three sets on the CPU in float64 (identical on every device), then move them."""
    g = torch.Generator().manual_seed(cfg.seed)
    x_tr = _draw(cfg.n_train, cfg.sampling, g)
    x_va = (
        _draw(cfg.n_val, cfg.sampling, g) if cfg.sampling == "uniform" else grid_points(cfg.n_val)
    )
    x_te = grid_points(cfg.n_test)
    y_tr, y_va, y_te = torch.sin(x_tr), torch.sin(x_va), torch.sin(x_te)
    if cfg.noise > 0:
        y_tr = y_tr + cfg.noise * torch.randn(cfg.n_train, generator=g, dtype=torch.float64)
        y_va = y_va + cfg.noise * torch.randn(cfg.n_val, generator=g, dtype=torch.float64)

    def put(t: torch.Tensor, inputs: bool = False) -> torch.Tensor:
        t = scale_inputs(t, cfg.input_scaling) if inputs else t
        return t.to(torch.float32).unsqueeze(1).to(device)  # (N, 1)

    return SinData(
        x_train=put(x_tr, True),
        y_train=put(y_tr),
        x_val=put(x_va, True),
        y_val=put(y_va),
        x_test=put(x_te, True),
        y_test=put(y_te),
    )
