"""The network: build_mlp(widths, activation), and the activation registry every engine reads."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from study.config import ACTIVATIONS as CONFIG_ACTIVATIONS

LEAKY_SLOPE = 0.01  # LeakyReLU's negative slope, in the module and in the batched kernel alike
ELU_ALPHA = 1.0

_aten, _nn = torch.ops.aten, torch._C._nn


@dataclass(frozen=True)
class Activation:
    """One activation, everything every engine needs of it. `module`: what train.py's network
    applies. `forward` / `backward`: the same function written into a given tensor (`out=`) and
    the derivative kernel autograd itself calls for the module, in place over the incoming
    gradient, for the batched engine's hand-written step (so it computes what loss.backward()
    computes). `zero_at_zero`: f(0) = 0, so zero-padded units stay exactly 0."""

    module: Callable[[], nn.Module]
    forward: Callable[[torch.Tensor, torch.Tensor], object]  # (z, out)
    # (grad, z, a); None: identity
    backward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object] | None
    zero_at_zero: bool = True


# The registry: config.ACTIVATIONS names the same keys (checked below). `identity` is "no
# activation": the network is then linear in x.
ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation(
        nn.ReLU,
        lambda z, o: torch.clamp_min(z, 0, out=o),
        lambda g, z, a: _aten.threshold_backward.grad_input(g, a, 0, grad_input=g),
    ),
    "tanh": Activation(
        nn.Tanh,
        lambda z, o: torch.tanh(z, out=o),
        lambda g, z, a: _aten.tanh_backward.grad_input(g, a, grad_input=g),
    ),
    "sigmoid": Activation(
        nn.Sigmoid,
        lambda z, o: torch.sigmoid(z, out=o),
        lambda g, z, a: _aten.sigmoid_backward.grad_input(g, a, grad_input=g),
        zero_at_zero=False,
    ),
    "silu": Activation(
        nn.SiLU,
        lambda z, o: _nn.silu(z, out=o),
        lambda g, z, a: _aten.silu_backward.grad_input(g, z, grad_input=g),
    ),
    "gelu": Activation(
        nn.GELU,
        lambda z, o: _nn.gelu(z, out=o),
        lambda g, z, a: _aten.gelu_backward.grad_input(g, z, grad_input=g),
    ),
    "leaky_relu": Activation(
        lambda: nn.LeakyReLU(LEAKY_SLOPE),
        lambda z, o: _nn.leaky_relu(z, LEAKY_SLOPE, out=o),
        lambda g, z, a: _aten.leaky_relu_backward.grad_input(
            g, z, LEAKY_SLOPE, False, grad_input=g
        ),
    ),
    "elu": Activation(
        lambda: nn.ELU(ELU_ALPHA),
        lambda z, o: _nn.elu(z, ELU_ALPHA, out=o),
        lambda g, z, a: _aten.elu_backward.grad_input(
            g, ELU_ALPHA, 1.0, 1.0, False, z, grad_input=g
        ),
    ),
    "identity": Activation(nn.Identity, lambda z, o: o.copy_(z), None),
}
if tuple(ACTIVATIONS) != CONFIG_ACTIVATIONS:  # a new activation needs its name in config too
    raise ImportError(
        f"model.ACTIVATIONS {tuple(ACTIVATIONS)} and config.ACTIVATIONS {CONFIG_ACTIVATIONS} "
        f"differ"
    )


def build_mlp(widths: Sequence[int], activation: str) -> nn.Sequential:
    """1 -> widths[0] -> ... -> widths[-1] -> 1, `activation` after every hidden layer.

    len(widths) is the depth (hidden layers). Weights use PyTorch's default Linear
    initialisation (Kaiming-uniform, a=sqrt(5)); seed torch before calling for repeatable weights.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; choose from {', '.join(ACTIVATIONS)}"
        )
    layers: list[nn.Module] = []
    fan_in = 1
    for w in widths:
        layers += [nn.Linear(fan_in, w), ACTIVATIONS[activation].module()]
        fan_in = w
    layers.append(nn.Linear(fan_in, 1))
    return nn.Sequential(*layers)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def init_model(
    widths: Sequence[int], activation: str, seed: int, device: torch.device | str
) -> nn.Sequential:
    """The same initial weights for the same seed on every device (drawn on the CPU, moved)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_mlp(widths, activation)
    return model.to(device)
