"""The private torch kernels the batched engine calls, probed once before it trains.

The engine steps Adam with `torch._fused_adam_` and computes each activation's derivative with
ATen's `*_backward.grad_input` overloads (study.trial.model.ACTIVATIONS): neither is public
API, and a torch release may rename them or change their arguments. pyproject.toml allows the
versions the equivalence tests passed on (TESTED_TORCH); a torch outside it that changed a
kernel would fail deep inside an epoch, so `check()` runs every kernel on a few numbers first
and turns a failure into one line that names the tested range.
"""

from __future__ import annotations

from functools import cache

import torch

from study.trial.model import ACTIVATIONS

# pyproject.toml's torch requirement; tests/test_kernels.py keeps the two equal
TESTED_TORCH = ">=2.11,<2.15"


class KernelError(RuntimeError):
    """A private kernel is missing or changed in this torch; the message is one line."""

    exit_code = 1  # the environment, not the user's input: the CLI prints the line alone


def _probe(device: str) -> None:
    z = torch.linspace(-1.0, 1.0, 8, device=device).view(2, 4)
    for name, act in ACTIVATIONS.items():
        a = torch.empty_like(z)
        act.forward(z, a)
        if act.backward is not None:
            g = torch.ones_like(z)
            act.backward(g, z, a)
            if not torch.isfinite(g).all():
                raise KernelError(f"the {name} derivative kernel returned non-finite values")
    rows = [list(torch.zeros(2, 4, device=device).unbind()) for _ in range(4)]
    rows[1] = list(torch.ones(2, 4, device=device).unbind())  # gradients
    steps = list(torch.ones(2, device=device).unbind())  # counted before the step, as torch.optim
    torch._fused_adam_(
        *rows,
        [],
        steps,
        lr=1.0,
        beta1=0.9,
        beta2=0.999,
        weight_decay=0.0,
        eps=1e-8,
        amsgrad=False,
        maximize=False,
    )
    # the first Adam step from zero moments moves each parameter by -lr * g / |g| = -1
    if not torch.allclose(rows[0][0], torch.full((4,), -1.0, device=device), atol=1e-4):
        raise KernelError("torch._fused_adam_ no longer computes Adam's step as expected")


@cache
def check(device: str = "cpu") -> None:
    """Raise KernelError (one line) if this torch lacks a kernel the batched engine calls."""
    try:
        _probe(device)
    except KernelError as e:
        raise KernelError(_advice(str(e))) from None
    except (AttributeError, RuntimeError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise KernelError(_advice(f"a private kernel failed ({first})")) from None


def _advice(what: str) -> str:
    return (
        f"torch {torch.__version__}: {what}; the batched engine is tested on torch"
        f"{TESTED_TORCH}: install a torch in that range (pip install 'torch{TESTED_TORCH}') "
        f"or run with --engine standard"
    )
