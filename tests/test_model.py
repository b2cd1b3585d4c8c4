from __future__ import annotations

import pytest
import torch
from torch import nn

from study.trial.model import ACTIVATIONS, build_mlp, init_model, n_params


def test_depth_and_width_define_the_layers():
    m = build_mlp((16, 8, 4), "tanh")
    linears = [layer for layer in m if isinstance(layer, nn.Linear)]
    assert [(x.in_features, x.out_features) for x in linears] == [(1, 16), (16, 8), (8, 4), (4, 1)]
    assert sum(isinstance(layer, nn.Tanh) for layer in m) == 3
    assert n_params(m) == (1 * 16 + 16) + (16 * 8 + 8) + (8 * 4 + 4) + (4 + 1)


def test_registry_has_the_required_activations():
    required = {"relu", "tanh", "sigmoid", "silu", "gelu", "leaky_relu", "elu", "identity"}
    assert required <= set(ACTIVATIONS)
    with pytest.raises(ValueError):
        build_mlp((4,), "swish")


def test_identity_network_is_affine_in_x():
    m = build_mlp((32, 32), "identity")
    x = torch.linspace(-1, 1, 50).unsqueeze(1)
    y = m(x).detach()
    second_diff = y[2:] - 2 * y[1:-1] + y[:-2]
    assert second_diff.abs().max() < 1e-5


def test_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = init_model((8,), "relu", seed=5, device="cpu")
    after = torch.rand(1)
    b = init_model((8,), "relu", seed=5, device="cpu")
    assert torch.equal(before, after)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
