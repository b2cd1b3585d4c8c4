"""Many trials trained as one computation, with the semantics of train.py.

A `Stack` holds K models side by side: weights [K, in, out], one torch.baddbmm per layer for all
of them. Models in one stack may differ in depth, width, activation, learning rate and schedule:
  - widths are padded to the widest member with zero weights and a 0/1 unit mask; a masked unit
    outputs exactly 0, so its incoming and outgoing weights get exactly zero gradient and the
    optimizer leaves them at 0 (Adam: m = v = 0 -> update 0);
  - depths are padded with pass-through layers: h = where(active, act(h W + b), h);
  - activations are applied per group of slots (slots sorted by activation: contiguous slices);
  - learning rates are a [K, 1, 1] tensor in a hand-written Adam / AdamW / SGD that follows
    torch.optim's formulas; every slot has its own step count and moments;
  - each slot draws its own minibatch order from its own generator, as train.py does.
One stack has one optimizer kind (the engine groups by it). Membership changes only between
epochs: `Stack.build` restacks the surviving and new slots, so no compute is spent on empty
slots and padding follows the current members, not the search space's extremes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .data import SinData
from .model import build_mlp, init_model
from .train import lr_at

_ACT = {
    "relu": F.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": F.silu, "gelu": F.gelu,
    "leaky_relu": lambda z: F.leaky_relu(z, 0.01), "elu": F.elu, "identity": lambda z: z,
}
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults


@dataclass
class Slot:
    """One model's own state, kept between restacks (tensors hold this slot's rows only)."""

    cfg: TrainConfig
    params: list[torch.Tensor]  # padded to the slot's own shape: [1, in, out] per layer
    state: list[list[torch.Tensor]]  # optimizer buffers per param (Adam: m, v; SGD: buf)
    order: torch.Generator  # minibatch order, seeded as train.py seeds it
    steps: int = 0  # optimizer steps taken
    epoch: int = 0  # epochs trained
    best_val: float = math.inf
    best_epoch: int = 0
    best_params: list[torch.Tensor] | None = None
    tag: object = None  # the caller's handle (the engine's Live record)


def new_slot(cfg: TrainConfig, device: torch.device | str, tag: object = None) -> Slot:
    """Weights exactly as train.py draws them (init_model), as [1, in, out] tensors."""
    model = init_model(cfg.widths, cfg.activation, cfg.seed, device)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    params = []
    for lin in linears:
        params += [lin.weight.detach().t().unsqueeze(0).clone(), lin.bias.detach().view(1, 1, -1).clone()]
    n_buf = 1 if cfg.optimizer == "sgd" else 2
    state = [[torch.zeros_like(p) for _ in range(n_buf)] for p in params]
    return Slot(cfg, params, state, torch.Generator().manual_seed(cfg.seed + 1), tag=tag)


def _pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[1, r, c] -> [1, rows, cols] with zeros."""
    return F.pad(t, (0, cols - t.shape[2], 0, rows - t.shape[1]))


def _layout(depth: int, width: int) -> list[tuple[int, int]]:
    """(rows, cols) of each padded weight and bias of a stack: in order W0, b0, ..., Wout, bout."""
    shapes = [(1, width), (1, width)]
    for _ in range(depth - 1):
        shapes += [(width, width), (1, width)]
    return shapes + [(width, 1), (1, 1)]


class Stack:
    """The slots of one optimizer kind, trained together. Rebuild with `build` after changes."""

    def __init__(self, slots: list[Slot], data: SinData):
        """Note: `build` sorts `slots` by activation; index results by `self.slots`."""
        self.data = data
        self.slots = slots
        self.build()

    # ---------------------------------------------------------------- (re)stacking

    def build(self) -> None:
        if not self.slots:
            return
        # Slots sorted by activation: each activation then applies to a contiguous slice (a view),
        # and one torch.cat joins them, instead of a gather and a full-size copy per activation.
        self.slots.sort(key=lambda x: x.cfg.activation)
        s = self.slots
        dev = self.data.device
        self.kind = s[0].cfg.optimizer
        assert all(x.cfg.optimizer == self.kind for x in s), "one optimizer kind per stack"
        bs = {x.cfg.batch_size for x in s}
        assert len(bs) == 1, "one batch size per stack"
        self.batch_size = bs.pop()
        self.depth = max(x.cfg.depth for x in s)
        self.width = max(max(x.cfg.widths) for x in s)
        layout = _layout(self.depth, self.width)
        self.params = [torch.cat([self._padded(x, x.params, i, r, c) for x in s]) .requires_grad_() for i, (r, c) in enumerate(layout)]
        n_buf = len(s[0].state[0])
        self.state = [[torch.cat([self._padded(x, [st[j] for st in x.state], i, r, c) for x in s]) for j in range(n_buf)]
                      for i, (r, c) in enumerate(layout)]
        self.best = [torch.cat([self._padded(x, x.best_params or x.params, i, r, c) for x in s]) for i, (r, c) in enumerate(layout)]
        # per layer: unit mask [K, 1, W] (1 where the unit exists) and active flag [K, 1, 1]
        self.unit_mask = []
        self.active = []
        for layer in range(self.depth):
            widths = [x.cfg.widths[layer] if layer < x.cfg.depth else 0 for x in s]
            mask = torch.zeros(len(s), 1, self.width, device=dev)
            for k, w in enumerate(widths):
                mask[k, 0, :w] = 1.0
            self.unit_mask.append(mask)
            flags = [layer < x.cfg.depth for x in s]
            # None where every slot has this layer: no pass-through select needed
            self.active.append(None if all(flags) else torch.tensor(flags, device=dev).view(-1, 1, 1))
        groups: dict[str, list[int]] = {}
        for k, x in enumerate(s):
            groups.setdefault(x.cfg.activation, []).append(k)
        self.groups = [(_ACT[a], ix[0], ix[-1] + 1) for a, ix in groups.items()]  # (fn, start, stop)
        # Padded units need the unit mask only where act(0) != 0: every other activation maps a
        # padded unit (zero weights, zero bias) to exactly 0, so its weights get exactly zero
        # gradient without a mask. Sigmoid (0.5) needs it; its slots form one slice.
        self.masked = [(lo, hi) for a, ix in groups.items() if a == "sigmoid" for lo, hi in [(ix[0], ix[-1] + 1)]]
        self.wd = torch.tensor([x.cfg.weight_decay for x in s], device=dev).view(-1, 1, 1)
        self.momentum = torch.tensor([x.cfg.momentum for x in s], device=dev).view(-1, 1, 1)
        self.any_wd = any(x.cfg.weight_decay for x in s)
        self.t = torch.tensor([float(x.steps) for x in s], device=dev).view(-1, 1, 1)  # step counts

    def _padded(self, slot: Slot, tensors: list[torch.Tensor], i: int, rows: int, cols: int) -> torch.Tensor:
        """Slot tensor i placed in the stack layout: the output layer stays last; hidden layers
        the slot lacks are zero (pass-through)."""
        n_own = len(tensors)
        n_stack = 2 * self.depth + 2
        if i >= n_stack - 2:  # output layer: the slot's last two tensors
            t = tensors[n_own - (n_stack - i)]
        elif i < n_own - 2:
            t = tensors[i]
        else:
            return torch.zeros(1, rows, cols, device=self.data.device)
        return _pad(t.detach(), rows, cols)

    def unstack(self) -> None:
        """Copy the stacked tensors back into each slot (before a rebuild)."""
        n_stack = 2 * self.depth + 2
        for k, x in enumerate(self.slots):
            own = _own_shapes(x.cfg)
            idx = [i for i in range(len(own) - 2)] + [n_stack - 2, n_stack - 1]
            x.params = [self.params[j][k : k + 1, : r, : c].detach().clone() for j, (r, c) in zip(idx, own)]
            x.state = [[self.state[j][b][k : k + 1, : r, : c].clone() for b in range(len(self.state[j]))] for j, (r, c) in zip(idx, own)]
            x.best_params = [self.best[j][k : k + 1, : r, : c].clone() for j, (r, c) in zip(idx, own)]

    # ---------------------------------------------------------------- computation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [K, B, 1] -> [K, B, 1], every slot its own network."""
        h = x
        p = self.params
        for layer in range(self.depth):
            z = torch.baddbmm(p[2 * layer + 1], h, p[2 * layer])  # [K, B, W]
            if len(self.groups) == 1:
                a = self.groups[0][0](z)
            else:
                a = torch.cat([fn(z[lo:hi]) for fn, lo, hi in self.groups])
            for lo, hi in self.masked:
                a = torch.cat([a[:lo], a[lo:hi] * self.unit_mask[layer][lo:hi], a[hi:]])
            active = self.active[layer]
            h = a if layer == 0 or active is None else torch.where(active, a, h)
        return torch.baddbmm(p[-1], h, p[-2])  # [K, B, 1]

    def lrs(self) -> torch.Tensor:
        """This epoch's learning rate per slot, [K, 1, 1] (schedules stepped per epoch)."""
        return torch.tensor([lr_at(x.cfg, x.epoch) for x in self.slots], device=self.data.device).view(-1, 1, 1)

    @torch.no_grad()
    def _step(self, lr: torch.Tensor, t: torch.Tensor) -> None:
        if self.kind != "sgd":  # per-slot bias corrections, once per step for every tensor
            step_size = lr / (1 - BETA1**t)
            bc2_sqrt = (1 - BETA2**t).sqrt()
        for p, st in zip(self.params, self.state):
            g = p.grad
            if self.kind == "sgd":
                if self.any_wd:
                    g = g + self.wd * p
                buf = st[0]
                buf.mul_(self.momentum).add_(g)  # first step: buf = 0 * m + g = g, as torch.optim.SGD
                p.sub_(lr * buf)
                continue
            if self.kind == "adamw" and self.any_wd:
                p.mul_(1 - lr * self.wd)
            elif self.any_wd:
                g = g + self.wd * p
            m, v = st
            m.lerp_(g, 1 - BETA1)
            v.mul_(BETA2).addcmul_(g, g, value=1 - BETA2)
            denom = v.sqrt().div_(bc2_sqrt).add_(EPS)
            p.sub_(m.div(denom).mul_(step_size))  # torch: p.addcdiv_(m, denom, value=-lr / bc1)

    def train_epoch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One epoch for every slot. Returns (train loss, validation MSE), each [K], on device.

        No host synchronisation inside: the caller reads both once per epoch."""
        d = self.data
        n = d.x_train.shape[0]
        perm = torch.stack([torch.randperm(n, generator=x.order) for x in self.slots]).to(d.device)  # [K, n]
        xs, ys = d.x_train[perm], d.y_train[perm]  # [K, n, 1]
        lr = self.lrs()
        total = torch.zeros(len(self.slots), device=d.device)
        for i in range(0, n, self.batch_size):
            xb, yb = xs[:, i : i + self.batch_size], ys[:, i : i + self.batch_size]
            loss = torch.mean((self.forward(xb) - yb) ** 2, dim=(1, 2))  # [K]: each slot's mean
            for p in self.params:
                p.grad = None
            loss.sum().backward()  # slots are independent: d(sum)/d(loss_k) = 1
            self.t += 1
            self._step(lr, self.t)
            total += loss.detach() * xb.shape[1]
        n_batches = math.ceil(n / self.batch_size)
        for x in self.slots:
            x.epoch += 1
            x.steps += n_batches
        with torch.no_grad():
            k = len(self.slots)
            val = torch.mean((self.forward(d.x_val.expand(k, -1, -1)) - d.y_val) ** 2, dim=(1, 2))
        return total / n, val

    @torch.no_grad()
    def keep_best(self, improved: torch.Tensor) -> None:
        """Copy this epoch's weights into the best-weights buffers where `improved` [K] is set."""
        m = improved.view(-1, 1, 1)
        for b, p in zip(self.best, self.params):
            b.copy_(torch.where(m, p, b))

    @torch.no_grad()
    def slot_model(self, k: int, which: str = "best") -> torch.nn.Sequential:
        """Slot k as a plain nn.Sequential (the exact train.py architecture, unpadded)."""
        x = self.slots[k]
        src = self.best if which == "best" else self.params
        model = build_mlp(x.cfg.widths, x.cfg.activation).to(self.data.device)
        linears = [m for m in model if isinstance(m, torch.nn.Linear)]
        n_stack = 2 * self.depth + 2
        for li, lin in enumerate(linears):
            wi = n_stack - 2 if li == len(linears) - 1 else 2 * li
            lin.weight.copy_(src[wi][k, : lin.in_features, : lin.out_features].t())
            lin.bias.copy_(src[wi + 1][k, 0, : lin.out_features])
        return model.eval()


def _own_shapes(cfg: TrainConfig) -> list[tuple[int, int]]:
    dims = [1, *cfg.widths, 1]
    shapes = []
    for a, b in zip(dims[:-1], dims[1:]):
        shapes += [(a, b), (1, b)]
    return shapes
