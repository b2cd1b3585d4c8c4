"""The plain training loop: what one trial means. Every faster path is tested against this.

train(cfg, data) trains one MLP on the sin data set and returns a TrainResult. It knows nothing of
Optuna; the objective passes `on_epoch`, which may raise (e.g. optuna.TrialPruned) to stop early.

Semantics, top to bottom:
  - weights from `init_model(seed)`; minibatch order from a CPU generator seeded `seed + 1`
  - each epoch: a fresh permutation, minibatches of `batch_size` (the last one may be smaller),
    MSE loss, one optimizer step per minibatch; then the scheduler steps once
  - after each epoch: validation MSE on the whole validation set, reported through `on_epoch`
  - a non-finite training loss ends training at once with `diverged` set (not an exception)
  - the trial's value is the BEST validation MSE over its epochs; the weights of that epoch are
    kept and the test MSE is measured on them, so value and test MSE describe the same network
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from study.config import TrainConfig
from study.trial.data import SinData
from study.trial.model import init_model, n_params


@dataclass(frozen=True)
class EpochLog:
    epoch: int  # 1-based: the number of epochs trained so far
    train_loss: float  # mean minibatch loss over the epoch
    val_mse: float
    lr: float  # learning rate used during this epoch


@dataclass
class TrainResult:
    best_val_mse: float  # the trial's value (inf if it diverged before one finite epoch)
    best_epoch: int
    final_val_mse: float
    test_mse: float  # on the best epoch's weights
    final_test_mse: float  # on the last epoch's weights (what a run without checkpointing keeps)
    epochs: int  # epochs actually trained
    n_params: int
    seconds: float
    device: str
    diverged: str | None  # why training stopped on a non-finite loss, else None
    model: nn.Module  # holds the best epoch's weights


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate during 0-based `epoch`: each schedule's closed form (stepped per epoch)."""
    if cfg.scheduler == "step":
        return cfg.lr * cfg.gamma ** (epoch // cfg.step_size)
    if cfg.scheduler == "exponential":
        return cfg.lr * cfg.gamma**epoch
    if cfg.scheduler == "cosine":  # CosineAnnealingLR(T_max=max_epochs, eta_min=0)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.max_epochs))
    return cfg.lr


def divergence(epoch: int, lr: float) -> str:
    """Why a run stopped: its training loss went non-finite in `epoch` (1-based) at rate `lr`."""
    return f"non-finite training loss in epoch {epoch} (lr={lr:.3g}): training diverged"


@torch.no_grad()
def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return torch.mean((model(x) - y) ** 2).item()  # note: a device sync on GPU, once per epoch


class Training:
    """One model's training, an epoch at a time: `train()` below is its loop. Kept apart so that
    a trial's repeats (several seeds) can train in lockstep, epoch by epoch, each exactly as
    train() trains it; which epoch's weights count as best is the caller's choice (`keep`)."""

    def __init__(self, cfg: TrainConfig, data: SinData):
        self.start = time.perf_counter()
        self.cfg, self.data = cfg, data
        self.model = init_model(cfg.widths, cfg.activation, cfg.seed, data.device)
        self.opt = make_optimizer(cfg, self.model.parameters())
        # minibatch order, same on every device
        self.order = torch.Generator().manual_seed(cfg.seed + 1)
        self.best_val, self.best_epoch, self.best_state = (
            math.inf,
            0,
            copy.deepcopy(self.model.state_dict()),
        )
        self.val, self.diverged, self.epoch = math.inf, None, 0

    def step(self) -> EpochLog | None:
        """Train one more epoch; its log, or None when the training loss went non-finite
        (`diverged` then says why, and the epoch does not count)."""
        cfg, data, model, opt = self.cfg, self.data, self.model, self.opt
        device, n = data.device, data.x_train.shape[0]
        self.epoch += 1
        lr = lr_at(cfg, self.epoch - 1)
        for group in opt.param_groups:
            group["lr"] = lr
        perm = torch.randperm(n, generator=self.order).to(device)
        model.train()
        total = torch.zeros((), device=device)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            loss = torch.mean((model(data.x_train[idx]) - data.y_train[idx]) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * idx.numel()
        train_loss = total.item() / n
        if not math.isfinite(train_loss):
            self.diverged = divergence(self.epoch, lr)
            return None
        model.eval()
        self.val = mse(model, data.x_val, data.y_val)
        return EpochLog(self.epoch, train_loss, self.val, lr)

    def keep(self) -> None:
        """This epoch's weights are the ones the result describes (value, test MSE, model)."""
        self.best_val, self.best_epoch = self.val, self.epoch
        self.best_state = copy.deepcopy(self.model.state_dict())

    def result(self) -> TrainResult:
        model, data = self.model, self.data
        model.eval()
        final_test = mse(model, data.x_test, data.y_test) if self.diverged is None else math.inf
        model.load_state_dict(self.best_state)
        return TrainResult(
            best_val_mse=self.best_val,
            best_epoch=self.best_epoch,
            final_val_mse=self.val,
            test_mse=mse(model, data.x_test, data.y_test) if self.best_epoch else math.inf,
            final_test_mse=final_test,
            epochs=self.epoch if self.diverged is None else self.epoch - 1,
            n_params=n_params(model),
            seconds=time.perf_counter() - self.start,
            device=str(data.device),
            diverged=self.diverged,
            model=model,
        )


def train(
    cfg: TrainConfig,
    data: SinData,
    *,
    on_epoch: Callable[[EpochLog], None] | None = None,
) -> TrainResult:
    run = Training(cfg, data)
    while run.epoch < cfg.max_epochs:
        log = run.step()
        if log is None:
            break
        if log.val_mse < run.best_val:
            run.keep()
        if on_epoch is not None:
            on_epoch(log)
    return run.result()


def train_repeats(
    cfgs: list[TrainConfig],
    data: SinData,
    *,
    on_epoch: Callable[[EpochLog], None] | None = None,
) -> list[TrainResult]:
    """A trial's repeats: one model per config (same but for the seed), in lockstep. Each epoch
    `on_epoch` gets the MEAN of their logs; the best epoch is that of the mean validation curve,
    and every model keeps its weights of that epoch. A model whose loss goes non-finite ends
    them all (`diverged` of its result says which epoch; the others' results are as of then)."""
    runs = [Training(c, data) for c in cfgs]
    best = math.inf
    while runs[0].epoch < cfgs[0].max_epochs:
        logs = [r.step() for r in runs]
        if any(log is None for log in logs):
            break
        val = sum(log.val_mse for log in logs) / len(logs)
        if val < best:
            best = val
            for r in runs:
                r.keep()
        if on_epoch is not None:
            on_epoch(
                EpochLog(
                    logs[0].epoch, sum(log.train_loss for log in logs) / len(logs), val, logs[0].lr
                )
            )
    return [r.result() for r in runs]
