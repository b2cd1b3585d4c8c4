"""Many trials trained as one computation, with the semantics of train.py.

A `Stack` holds K models side by side. All of a model's numbers live in one row of a flat
[K, N] tensor (weights, biases); each layer's weight is a [K, in, out] view of it, so one
torch.baddbmm per layer runs every model, and the optimizer updates all K rows in a few fused
passes. Models in one stack may differ in depth, width, activation, learning rate and schedule:
  - widths are padded with zero weights to the widest member. A padded unit outputs exactly 0
    (every activation but sigmoid maps 0 to 0; sigmoid slots multiply by a 0/1 unit mask), so
    its weights get exactly zero gradient and Adam / SGD leave them at 0;
  - depths are padded with pass-through layers: a slot's rows skip the layers it lacks (h is
    copied through, its gradient carried past them);
  - activations apply per group of slots (slots sorted by activation: contiguous slices);
  - the learning rate is a [K, 1] tensor; each slot has its own step count and moments.
Forward and backward are written out (four lines per layer, ATen's own derivative kernels)
instead of going through autograd: autograd's per-slice backward of the activation groups
allocated and zero-filled a full-size gradient per group and layer, which was half the time.
Adam is torch's fused kernel (torch._fused_adam_, the one behind Adam(fused=True)) run with
lr = 1 on a zeroed scratch row per slot, which leaves -m_hat / (sqrt(v_hat) + eps) there with
each slot's own bias correction; one addcmul then applies each slot's learning rate.
Each slot draws its own minibatch order from its own generator, as train.py does.

One stack has one optimizer kind and one batch size (the engine groups by them). Membership
changes only between epochs: `unstack` hands each slot its rows, `build` joins the current
members (one torch.cat per buffer) and re-lays-out only slots whose padded shape changed, so
no compute is spent on empty slots and padding follows the members, not the search space.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch

from study.config import TrainConfig
from study.trial.data import SinData
from study.trial.model import ACTIVATIONS, build_mlp, init_model
from study.trial.train import lr_at

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults

Layout = tuple[int, int]  # (depth, width) of a padded row


@cache
def segments(layout: Layout) -> tuple[tuple[int, int, int], ...]:
    """(offset, rows, cols) of each weight and bias in a row: W0, b0, ..., W_out, b_out."""
    depth, width = layout
    shapes = [(1, width), (1, width)]
    for _ in range(depth - 1):
        shapes += [(width, width), (1, width)]
    shapes += [(width, 1), (1, 1)]
    out, off = [], 0
    for r, c in shapes:
        out.append((off, r, c))
        off += r * c
    return tuple(out)


def row_size(layout: Layout) -> int:
    off, r, c = segments(layout)[-1]
    return off + r * c


class _Buffers:
    """The activations of one batch size, allocated once per build: every step writes into the
    same memory (no allocator work per step, and the static addresses a CUDA graph needs). The
    per-group slices of each buffer are made here once, not in every step."""

    def __init__(self, stack: Stack, b: int):
        k, w, dev = len(stack.slots), stack.width, stack.data.device
        depth = stack.depth
        self.z = [torch.empty(k, b, w, device=dev) for _ in range(depth)]  # pre-activations
        self.h = [torch.empty(k, b, w, device=dev) for _ in range(depth)]  # activations
        self.h_t = [h.transpose(1, 2) for h in self.h]  # for dW = h^T @ dz
        self.y = torch.empty(k, b, 1, device=dev)
        self.dy = torch.empty(k, b, 1, device=dev)  # d loss / d output
        # two gradient buffers, alternating from the top layer down (bmm's out must not alias its
        # input)
        self.dh = [torch.empty(k, b, w, device=dev) for _ in range(2)]
        self.top = self.dh[0]
        self.fwd, self.bwd, self.mask, self.dz = [], [], [], []
        for layer in range(depth):
            z, a, dz = self.z[layer], self.h[layer], self.dh[(depth - 1 - layer) % 2]
            self.dz.append(dz)
            self.fwd.append([(act.forward, z[lo:hi], a[lo:hi]) for act, lo, hi in stack.groups])
            self.bwd.append(
                [
                    (act.backward, dz[lo:hi], z[lo:hi], a[lo:hi])
                    for act, lo, hi in stack.groups
                    if act.backward
                ]
            )
            self.mask.append(
                [(a[lo:hi], stack.unit_mask[layer][lo:hi]) for lo, hi in stack.masked]
            )


def _own(cfg: TrainConfig, depth: int) -> list[tuple[int, int, int]]:
    """(segment index in a layout of `depth` layers, rows, cols) of each of the slot's tensors."""
    dims = [1, *cfg.widths, 1]
    out = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        j = 2 * i if i < cfg.depth else 2 * depth  # the output layer is always last
        out += [(j, a, b), (j + 1, 1, b)]
    return out


def _views(flat: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """[K, N] -> per segment [K, rows, cols] views (no copy)."""
    k = flat.shape[0]
    return [flat[:, off : off + r * c].view(k, r, c) for off, r, c in segments(layout)]


def _linears(model: torch.nn.Sequential, cfg: TrainConfig, row: torch.Tensor, layout: Layout):
    """Each nn.Linear of a train.py model with the views of its weight^T [in, out] and bias [out]
    in a row [1, N] laid out as `layout` (the same numbers, both directions)."""
    views = _views(row, layout)
    own = iter(_own(cfg, layout[0]))
    for lin in (m for m in model if isinstance(m, torch.nn.Linear)):
        (j, r, c), (jb, _, _) = next(own), next(own)
        yield lin, views[j][0, :r, :c], views[jb][0, 0, :c]


@dataclass
class Slot:
    """One model's own state, kept between restacks: rows [1, N] in `layout`."""

    cfg: TrainConfig
    layout: Layout
    rows: list[torch.Tensor]  # params, optimizer buffers (Adam: m, v; SGD: momentum), best params
    order: torch.Generator  # minibatch order, seeded as train.py seeds it
    steps: int = 0  # optimizer steps taken
    epoch: int = 0  # epochs trained
    best_val: float = math.inf
    best_epoch: int = 0
    last_val: float = math.inf  # validation MSE of the last epoch its trial reported
    tag: object = None  # the caller's handle (the engine's Live record)
    empty: bool = False  # a fixed-capacity stack's free position: trains nothing (lr 0)


def new_slot(cfg: TrainConfig, device: torch.device | str, tag: object = None) -> Slot:
    """Weights exactly as train.py draws them (init_model), in a row of the slot's own size."""
    model = init_model(cfg.widths, cfg.activation, cfg.seed, device)
    layout = (cfg.depth, max(cfg.widths))
    p = torch.zeros(1, row_size(layout), device=device)
    with torch.no_grad():
        for lin, weight, bias in _linears(model, cfg, p, layout):
            weight.copy_(lin.weight.t())
            bias.copy_(lin.bias)
    n_buf = 1 if cfg.optimizer == "sgd" else 2
    rows = [p] + [torch.zeros_like(p) for _ in range(n_buf)] + [p.clone()]
    return Slot(cfg, layout, rows, torch.Generator().manual_seed(cfg.seed + 1), tag=tag)


def relayout(slot: Slot, layout: Layout) -> None:
    """Move the slot's rows into another padded shape (same numbers, zero padding)."""
    if slot.layout == layout:
        return
    src_own, dst_own = _own(slot.cfg, slot.layout[0]), _own(slot.cfg, layout[0])
    new = []
    for row in slot.rows:
        out = torch.zeros(1, row_size(layout), device=row.device)
        src, dst = _views(row, slot.layout), _views(out, layout)
        for (i, r, c), (j, _, _) in zip(src_own, dst_own, strict=True):
            dst[j][:, :r, :c] = src[i][:, :r, :c]
        new.append(out)
    slot.rows, slot.layout = new, layout


def empty_slot(cfg: TrainConfig, layout: Layout, device: torch.device | str) -> Slot:
    """A free position of a fixed-capacity stack, shaped as `cfg` (its activation and depth):
    zero weights, which a learning rate of 0 keeps at zero."""
    n_buf = 1 if cfg.optimizer == "sgd" else 2
    rows = [torch.zeros(1, row_size(layout), device=device) for _ in range(n_buf + 2)]
    return Slot(cfg, layout, rows, torch.Generator().manual_seed(0), empty=True)


class Stack:
    """The slots of one optimizer kind, trained together. Rebuild with `build` after changes,
    or, with a fixed `layout` (fixed capacity), `vacate` and `refill` positions in place."""

    def __init__(
        self,
        slots: list[Slot],
        data: SinData,
        layout: Layout | None = None,
        capture: Capture | None = None,
    ):
        """Note: `build` sorts `slots` by activation; index results by `self.slots`.
        `layout`: the padded shape, fixed (default: the members' widest and deepest), so that
        any member of the shape class can take a free position later. `capture`: run the
        epochs as one captured graph, replayed (EpochGraph; `cuda_graph` on a GPU)."""
        self.data = data
        self.slots = slots
        self.fixed = layout
        self.version = 0  # a capture of `epoch` holds while this stays (EpochGraph)
        self.build()
        self.graph = EpochGraph(self, capture) if capture else None

    # ---------------------------------------------------------------- (re)stacking

    def build(self) -> None:
        if not self.slots:
            return
        self.version += 1  # new buffers
        # Slots sorted by activation: each activation then applies to a contiguous slice (a view).
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
        if self.fixed is not None:
            assert self.fixed[0] >= self.depth and self.fixed[1] >= self.width, "too small"
            self.depth, self.width = self.fixed
        self.layout = (self.depth, self.width)
        for x in s:
            relayout(x, self.layout)
        # one [K, N] tensor per buffer: params, optimizer state, best params
        self.flat = [torch.cat([x.rows[j] for x in s]) for j in range(len(s[0].rows))]
        self.p, self.state, self.best = self.flat[0], self.flat[1:-1], self.flat[-1]
        self.params = _views(self.p, self.layout)
        # W^T per layer, for dh = dz @ W^T
        self.weights_t = [w.transpose(1, 2) for w in self.params[0::2]]
        k = len(s)
        self.grad = torch.empty_like(self.p)
        # bmm/sum write here
        self.grads = [torch.empty(k, r, c, device=dev) for _, r, c in segments(self.layout)]
        self._grad_rows = [g.view(k, -1) for g in self.grads]
        self._bufs: dict[int, _Buffers] = {}
        n = self.data.x_train.shape[0]
        # this epoch's inputs and targets, in each slot's order
        self.xs = torch.empty(k, n, 1, device=dev)
        self.ys = torch.empty(k, n, 1, device=dev)
        self.x_val = self.data.x_val.expand(k, -1, -1)
        self.batches = [(i, min(self.batch_size, n - i)) for i in range(0, n, self.batch_size)]
        self.diffs = torch.empty(k, n, 1, device=dev)  # output - target of the epoch's every point
        groups: dict[str, list[int]] = {}
        for i, x in enumerate(s):
            groups.setdefault(x.cfg.activation, []).append(i)
        # (Activation, start, stop)
        self.groups = [(ACTIVATIONS[a], ix[0], ix[-1] + 1) for a, ix in groups.items()]
        self.masked = [
            (ix[0], ix[-1] + 1) for a, ix in groups.items() if not ACTIVATIONS[a].zero_at_zero
        ]
        # per layer: the rows that pass through it (slots shallower than the stack), or None
        # where every slot has it; and, only with slots whose f(0) != 0 (sigmoid), the unit mask
        # [K, 1, W]
        self.unit_mask, self.passing = [], []
        for layer in range(self.depth):
            rows = [i for i, x in enumerate(s) if x.cfg.depth <= layer]
            self.passing.append(torch.tensor(rows, device=dev) if rows else None)
            if self.masked:
                mask = torch.zeros(k, 1, self.width, device=dev)
                for i, x in enumerate(s):
                    mask[i, 0, : (x.cfg.widths[layer] if layer < x.cfg.depth else 0)] = 1.0
                self.unit_mask.append(mask)
        self.wd = torch.tensor([x.cfg.weight_decay for x in s], device=dev).view(-1, 1)
        self.any_wd = any(x.cfg.weight_decay for x in s)
        self.momentum = torch.tensor([x.cfg.momentum for x in s], device=dev).view(-1, 1)
        self.t = torch.tensor([float(x.steps) for x in s], device=dev)  # Adam's step counts
        if self.kind != "sgd":  # the fused kernel's per-slot lists (views, built once per build)
            self.scratch = torch.empty_like(self.p)
            rows = [list(t.unbind()) for t in (self.scratch, self.grad, *self.state, self.t)]
            self._adam_args = (*rows[:4], [], rows[4])

    @property
    def members(self) -> int:
        """Slots that train a model (a fixed-capacity stack's free positions excepted)."""
        return sum(not x.empty for x in self.slots)

    def free(self) -> list[int]:
        return [k for k, x in enumerate(self.slots) if x.empty]

    @torch.no_grad()
    def vacate(self, k: int) -> None:
        """Fixed capacity: position k's model has left. Its rows are zeroed and its learning rate
        is 0 from now on, so it trains nothing until `refill`; nothing is reallocated."""
        old = self.slots[k]
        for f in self.flat:
            f[k].zero_()
        self.t[k] = 0.0
        rows = [f[k : k + 1] for f in self.flat]
        self.slots[k] = Slot(old.cfg, self.layout, rows, old.order, empty=True)

    @torch.no_grad()
    def refill(self, k: int, slot: Slot) -> None:
        """Fixed capacity: a new model takes free position k in place (its weights, zeroed
        moments and step count, its own generator). The position's activation and depth are
        kept: the activation groups and pass-through rows were laid out for them at build."""
        old, cfg = self.slots[k], slot.cfg
        assert old.empty, f"position {k} is not free"
        assert (cfg.activation, cfg.depth) == (old.cfg.activation, old.cfg.depth), "other class"
        assert (cfg.optimizer, cfg.batch_size) == (self.kind, self.batch_size), "other stack"
        assert max(cfg.widths) <= self.width and cfg.depth <= self.depth, "wider than the stack"
        relayout(slot, self.layout)
        for f, row in zip(self.flat, slot.rows, strict=True):
            f[k : k + 1].copy_(row)
        slot.rows = [f[k : k + 1] for f in self.flat]
        self.t[k] = float(slot.steps)
        self.wd[k] = cfg.weight_decay
        self.momentum[k] = cfg.momentum
        if cfg.weight_decay and not self.any_wd:
            self.any_wd = True
            self.version += 1  # the step now has weight-decay kernels, which a capture lacks
        if self.masked:  # units past its widths stay exactly 0 under f(0) != 0 (sigmoid)
            for layer, mask in enumerate(self.unit_mask):
                mask[k].zero_()
                mask[k, 0, : (cfg.widths[layer] if layer < cfg.depth else 0)] = 1.0
        self.slots[k] = slot

    def unstack(self) -> None:
        """Hand each slot its rows back (views; the next build copies them into a new stack)."""
        for k, x in enumerate(self.slots):
            x.rows = [f[k : k + 1] for f in self.flat]
            x.layout = self.layout

    # ---------------------------------------------------------------- computation

    def _buffers(self, b: int) -> _Buffers:
        if b not in self._bufs:
            self._bufs[b] = _Buffers(self, b)
        return self._bufs[b]

    def forward(self, x: torch.Tensor, buf: _Buffers) -> torch.Tensor:
        """x [K, B, 1] -> [K, B, 1], every slot its own network, into `buf`: the
        pre-activations and activations stay there for the backward pass."""
        h = x
        p = self.params
        for layer in range(self.depth):
            torch.baddbmm(p[2 * layer + 1], h, p[2 * layer], out=buf.z[layer])  # [K, B, W]
            for forward, z, a in buf.fwd[layer]:
                forward(z, a)
            for a, mask in buf.mask[layer]:
                a *= mask
            a = buf.h[layer]
            rows = self.passing[layer]
            if rows is not None:  # a layer these slots lack: their h passes through unchanged
                a.index_copy_(0, rows, h.index_select(0, rows))
            h = a
        return torch.baddbmm(p[-1], h, p[-2], out=buf.y)  # [K, B, 1]

    def _backward(self, x: torch.Tensor, dy: torch.Tensor, buf: _Buffers) -> None:
        """Gradients of the sum over slots of their losses into self.grads, given
        dy = d loss / d output [K, B, 1]: what autograd computes for forward(), kernel for
        kernel."""
        g, d, wt = self.grads, self.depth, self.weights_t
        torch.bmm(buf.h_t[d - 1], dy, out=g[-2])
        torch.sum(dy, 1, keepdim=True, out=g[-1])
        torch.bmm(dy, wt[-1], out=buf.top)
        for layer in reversed(range(d)):
            dz = buf.dz[layer]
            rows = self.passing[layer]
            if rows is not None:  # pass-through rows: their gradient skips the layer
                carry = dz.index_select(0, rows)
                dz.index_fill_(0, rows, 0.0)
            for backward, grad, z, a in buf.bwd[layer]:
                backward(grad, z, a)  # d loss / d activation becomes d loss / d z, in place
            torch.bmm(buf.h_t[layer - 1] if layer else x.transpose(1, 2), dz, out=g[2 * layer])
            torch.sum(dz, 1, keepdim=True, out=g[2 * layer + 1])
            if layer:
                below = torch.bmm(dz, wt[layer], out=buf.dz[layer - 1])
                if rows is not None:  # their rows of dz @ W^T are exactly 0 (zero weights)
                    below.index_copy_(0, rows, carry)

    def lrs(self) -> torch.Tensor:
        """This epoch's learning rate per slot, [K, 1] (schedules stepped per epoch)."""
        return torch.tensor(
            [0.0 if x.empty else lr_at(x.cfg, x.epoch) for x in self.slots],
            device=self.data.device,
        ).view(-1, 1)

    @torch.no_grad()
    def _step(self, lr: torch.Tensor) -> None:
        """One optimizer step for every slot, as torch.optim does it (gradients in self.grad)."""
        p, g = self.p, self.grad
        if self.kind == "sgd":
            if self.any_wd:
                g.addcmul_(p, self.wd)
            buf = self.state[0]
            buf.mul_(self.momentum).add_(g)  # first step: buf = 0 * m + g = g, as torch.optim.SGD
            p.addcmul_(buf, lr, value=-1.0)
            return
        if self.kind == "adamw" and self.any_wd:
            p.mul_(1 - lr * self.wd)
        elif self.any_wd:
            g.addcmul_(p, self.wd)
        self.t += 1
        self.scratch.zero_()
        torch._fused_adam_(
            *self._adam_args,
            lr=1.0,
            beta1=BETA1,
            beta2=BETA2,
            weight_decay=0.0,
            eps=EPS,
            amsgrad=False,
            maximize=False,
        )
        p.addcmul_(self.scratch, lr)  # scratch = -m_hat / (sqrt(v_hat) + eps), per slot

    def orders(self) -> torch.Tensor:
        """This epoch's minibatch order of every slot, [K, n], each from the slot's generator."""
        n = self.data.x_train.shape[0]
        return torch.stack([torch.randperm(n, generator=x.order) for x in self.slots]).to(
            self.data.device
        )

    @torch.no_grad()
    def train_epoch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One epoch for every slot. Returns (train loss, validation MSE), each [K], on device.

        No host synchronisation inside: the caller reads both once per epoch."""
        orders, lrs = self.orders(), self.lrs()
        out = self.graph.run(orders, lrs) if self.graph else self.epoch(orders, lrs)
        n_batches = len(self.batches)
        for x in self.slots:
            x.epoch += 1
            x.steps += n_batches
        return out

    @torch.no_grad()
    def epoch(self, perm: torch.Tensor, lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The device work of one epoch, given each slot's order [K, n] and learning rate [K, 1]:
        fixed shapes and addresses, no host work, so a CUDA graph can capture it whole."""
        d = self.data
        torch.index_select(d.x_train, 0, perm.view(-1), out=self.xs.view(-1, 1))
        torch.index_select(d.y_train, 0, perm.view(-1), out=self.ys.view(-1, 1))
        for i, b in self.batches:
            buf = self._buffers(b)
            xb, yb = self.xs[:, i : i + b], self.ys[:, i : i + b]
            # kept for the epoch's loss
            diff = torch.sub(self.forward(xb, buf), yb, out=self.diffs[:, i : i + b])
            # d mean(diff^2) / d output
            self._backward(xb, torch.mul(diff, 2.0 / b, out=buf.dy), buf)
            torch.cat(self._grad_rows, dim=1, out=self.grad)
            self._step(lr)
        val_buf = self._buffers(self.x_val.shape[1])
        val = torch.mean((self.forward(self.x_val, val_buf) - d.y_val) ** 2, dim=(1, 2))
        # sum over batches of (batch mean x batch size) / n, as train.py adds it up: the mean of
        # all
        return torch.mean(self.diffs * self.diffs, dim=(1, 2)), val

    @torch.no_grad()
    def keep_best(self, improved: torch.Tensor) -> None:
        """Copy this epoch's weights into the best-weights rows where `improved` [K] is set."""
        self.best.copy_(torch.where(improved.view(-1, 1), self.p, self.best))

    @torch.no_grad()
    def slot_model(self, k: int, which: str = "best") -> torch.nn.Sequential:
        """Slot k as a plain nn.Sequential (the exact train.py architecture, unpadded)."""
        x = self.slots[k]
        model = build_mlp(x.cfg.widths, x.cfg.activation).to(self.data.device)
        row = (self.best if which == "best" else self.p)[k : k + 1]
        for lin, weight, bias in _linears(model, x.cfg, row, self.layout):
            lin.weight.copy_(weight.t())
            lin.bias.copy_(bias)
        return model.eval()


# A capture: given the epoch as a function of its static inputs (no arguments), returns the
# function that replays it and returns its outputs.
Capture = Callable[[Callable[[], tuple]], Callable[[], tuple]]


def cuda_graph(epoch: Callable[[], tuple]) -> Callable[[], tuple]:
    """`epoch` captured once as a CUDA graph: each replay relaunches all its kernels at once,
    reading its inputs and writing its outputs where they were at the capture."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = epoch()

    def replay() -> tuple:
        graph.replay()
        return outputs

    return replay


def eager(epoch: Callable[[], tuple]) -> Callable[[], tuple]:
    """The same plumbing with each replay run eagerly: what the CPU tests check of EpochGraph."""
    return epoch


class EpochGraph:
    """A fixed-capacity stack's epoch, captured once and replayed while the stack keeps its
    buffers and the branches the capture took (`Stack.version`: a build, a refill that brings
    the first weight decay). The epoch's orders and learning rates are copied into the static
    tensors the capture reads; the first epoch after a change runs eagerly (the warm-up a
    capture needs) and is then captured for the next."""

    def __init__(self, stack: Stack, capture: Capture):
        self.stack, self.capture = stack, capture
        self.version: int | None = None
        self.captures = 0

    def run(self, perm: torch.Tensor, lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.stack
        if self.version != s.version:
            out = s.epoch(perm, lr)
            out = (out[0].clone(), out[1].clone())  # the capture's own outputs overwrite theirs
            self.perm, self.lr = perm.clone(), lr.clone()
            self.replay = self.capture(lambda: s.epoch(self.perm, self.lr))
            self.version, self.captures = s.version, self.captures + 1
            return out
        self.perm.copy_(perm)
        self.lr.copy_(lr)
        return self.replay()
