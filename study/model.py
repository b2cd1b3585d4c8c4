"""The network: build_mlp(widths, activation) and the activation registry."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

# name -> module factory. `identity` is "no activation": the network is then linear in x.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "elu": nn.ELU,
    "identity": nn.Identity,
}


def build_mlp(widths: Sequence[int], activation: str) -> nn.Sequential:
    """1 -> widths[0] -> ... -> widths[-1] -> 1, `activation` after every hidden layer.

    len(widths) is the depth (hidden layers). Weights use PyTorch's default Linear
    initialisation (Kaiming-uniform, a=sqrt(5)); seed torch before calling for repeatable weights.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {', '.join(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    fan_in = 1
    for w in widths:
        layers += [nn.Linear(fan_in, w), ACTIVATIONS[activation]()]
        fan_in = w
    layers.append(nn.Linear(fan_in, 1))
    return nn.Sequential(*layers)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def init_model(widths: Sequence[int], activation: str, seed: int, device: torch.device | str) -> nn.Sequential:
    """The same initial weights for the same seed on every device (drawn on the CPU, then moved)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_mlp(widths, activation)
    return model.to(device)
