"""The batched engine: K trials train at once in `Stack`s; Optuna decides from an in-memory mirror.

Bookkeeping is the cost here, not arithmetic: on SQLite, report() + should_prune() take ~5 ms
per trial per epoch, more than an epoch of a whole stack. So the sampler and the pruner run on an
in-memory copy of the study (`mirror`, seeded with the stored study's finished trials), where
ask/report/should_prune cost ~0.1 ms, and each trial reaches the real storage once, when it ends,
through the writer process (study.writer): its params, every epoch's intermediate value and its
user attrs in one transaction, its artifacts when it is a new best, its TensorBoard run. What
lands in storage is what the standard engine writes. A crash or kill loses only the trials still
training or not yet handed to the writer; the study is never half-written. Ctrl-C / SIGTERM
write the trials still training as FAIL with their curves.

A pruned, diverged or finished slot is replaced at the next epoch by a newly asked trial (fresh
weights, reset optimizer state), so the device never idles while the budget lasts.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import optuna
import torch
from optuna.trial import TrialState

from . import interrupt
from .batched import Slot, Stack, new_slot
from .config import StudyConfig
from .data import make_data
from .model import n_params
from .objective import WORKER, result_attrs, trial_seed
from .space import grid_started, suggest
from .train import EpochLog, TrainResult, lr_at, mse
from .writer import Record, Writer, Written

DEFAULT_SLOTS = {"cpu": 32, "cuda": 1024}


@dataclass
class Live:
    """What the engine keeps for a slot's trial while it trains."""

    trial: optuna.Trial  # in the mirror
    started: datetime
    values: dict[int, float] = field(default_factory=dict)  # epoch -> validation MSE
    epochs: list[tuple[EpochLog, float]] = field(default_factory=list)  # TensorBoard points, wall time


@dataclass
class Stats:
    book_seconds: float = 0.0  # sampler and pruner in the training loop, plus the final wait for the writer


def _key(slot: Slot) -> tuple[str, int, int]:
    """Stack by optimizer kind, depth and width class (<= 32, <= 64, then powers of two), so
    little compute goes to padding. Measured on the 2-core CPU, one epoch of 64 mixed small-space
    trials: one stack 159 ms, one per depth 96 ms, per depth and width class 80 ms (classes
    from 16 up: 89 ms, the extra stacks' fixed cost outweighs the padding they save)."""
    w = max(slot.cfg.widths)
    return slot.cfg.optimizer, slot.cfg.depth, 32 if w <= 32 else 1 << (w - 1).bit_length()


class BatchedEngine:
    def __init__(self, cfg: StudyConfig, study: optuna.Study, device: torch.device, *, slots: int,
                 on_trial: Callable[[Written], None] = lambda written: None):
        self.cfg, self.device, self.k = cfg, device, slots
        self.on_trial = on_trial
        self.data = make_data(cfg.data, device)
        self.stacks: dict[tuple[str, int, int], Stack] = {}
        self.stats = Stats()
        self.writer: Writer | None = None
        self.dirty: set[tuple[str, int, int]] = set()  # stacks whose slots changed since their build
        from .runner import make_pruner, make_sampler

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # Same name as the stored study: Hyperband assigns brackets by a hash of name and number.
            self.mirror = optuna.create_study(study_name=cfg.study, direction="minimize", sampler=make_sampler(cfg), pruner=make_pruner(cfg))
            done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
            self.mirror.add_trials(done)  # TPE's history and the pruner's rungs
        complete = [t.value for t in done if t.state == TrialState.COMPLETE]
        self.best_value = min(complete, default=math.inf)

    # ---------------------------------------------------------------- the loop

    def run(self, budget) -> int:
        """Train until the budget is spent. Returns the interrupting signal, or 0. Returns only
        when every finished trial is stored; unless interrupted, the writer then updates the
        study note the dashboard shows."""
        self.writer = Writer(self.cfg)
        clean = False
        threads = torch.get_num_threads()
        if self.device.type == "cpu" and threads > 1:
            # Leave the writer process a core. Torch's OpenMP threads spin at every parallel
            # region's barrier; with one of them descheduled by the writer, an epoch took 1.5x
            # as long (2-core CPU: training 13.3 s with 2 threads, 8.7 s with 1).
            torch.set_num_threads(threads - 1)
        try:
            while True:
                self._fill(budget)
                if not self.stacks:
                    break
                # sorted: the same order in every process (str hashing is salted per process),
                # so the mirror sees reports and tells in the same order and a seed repeats
                ended: list[tuple[tuple, int, TrialState, str | None]] = []
                for key in sorted(self.stacks):
                    loss, val = self.stacks[key].train_epoch()
                    ended += [(key, *e) for e in self._after_epoch(key, loss.tolist(), val.tolist())]  # one sync per stack per epoch
                self._end(ended)
                self._collect(self.writer.poll())
                if interrupt.requested():
                    self._abandon()
                    break
            clean = True
        finally:
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            written = self.writer.close(publish=clean and not interrupt.requested())
            self.stats.book_seconds += time.perf_counter() - t0
        self._collect(written)
        return interrupt.requested()

    def _collect(self, written: list[Written]) -> None:
        for w in written:
            self.on_trial(w)

    def _fill(self, budget) -> None:
        live = sum(len(s.slots) for s in self.stacks.values())
        new: dict[tuple[str, int, int], list[Slot]] = {}
        t0 = time.perf_counter()
        while live < self.k and not interrupt.requested() and not self._grid_started() and budget.claim():
            trial = self.mirror.ask()
            tcfg = suggest(trial, self.cfg.space, self.cfg.train, seed=trial_seed(self.cfg, trial.number))
            slot = new_slot(tcfg, self.device, tag=Live(trial, datetime.now()))
            new.setdefault(_key(slot), []).append(slot)
            live += 1
        self.stats.book_seconds += time.perf_counter() - t0
        # One restack per changed stack per epoch: the slots that left (already unstacked in
        # _end) and the ones that arrive are applied together.
        for key in sorted(set(new) | self.dirty):
            stack = self.stacks.get(key)
            if stack is None:
                self.stacks[key] = Stack(new[key], self.data)
                continue
            if key not in self.dirty:
                stack.unstack()
            stack.slots += new.get(key, [])
            if stack.slots:
                stack.build()
            else:
                del self.stacks[key]
        self.dirty.clear()

    def _after_epoch(self, key, loss: list[float], val: list[float]) -> list[tuple[int, TrialState, str | None]]:
        """Report each slot's epoch to the mirror; returns the slots whose trial ends now."""
        stack = self.stacks[key]
        improved = [v < x.best_val for v, x in zip(val, stack.slots)]
        if any(improved):
            stack.keep_best(torch.tensor(improved, device=self.device))
        t0 = time.perf_counter()
        now = time.time()
        done: list[tuple[int, TrialState, str | None]] = []
        for k, x in enumerate(stack.slots):
            live: Live = x.tag
            if improved[k]:
                x.best_val, x.best_epoch = val[k], x.epoch
            if not math.isfinite(loss[k]):
                reason = f"non-finite training loss in epoch {x.epoch} (lr={lr_at(x.cfg, x.epoch - 1):.3g}): training diverged"
                done.append((k, TrialState.PRUNED, reason))
                continue
            live.values[x.epoch] = val[k]
            live.epochs.append((EpochLog(x.epoch, loss[k], val[k], lr_at(x.cfg, x.epoch - 1)), now))
            live.trial.report(val[k], x.epoch)
            if live.trial.should_prune():
                done.append((k, TrialState.PRUNED, f"pruner stopped it after epoch {x.epoch}"))
            elif x.epoch >= x.cfg.max_epochs:
                done.append((k, TrialState.COMPLETE, None))
        self.stats.book_seconds += time.perf_counter() - t0
        return done

    def _end(self, ended: list[tuple[tuple, int, TrialState, str | None]]) -> None:
        """Tell and hand over the trials that ended this epoch, then take them out of their stacks."""
        t0 = time.perf_counter()
        # Trials that end in the same epoch have no order of their own: complete ones go first,
        # best first, so at most one of them is a new best (its artifacts cost ~0.1 s to write).
        def order(e):
            key, k, state, _ = e
            return (state != TrialState.COMPLETE, self.stacks[key].slots[k].best_val if state == TrialState.COMPLETE else 0.0)

        for key, k, state, reason in sorted(ended, key=order):
            self._finish(self.stacks[key], k, state, reason)
        self.stats.book_seconds += time.perf_counter() - t0
        for key in {e[0] for e in ended}:
            stack = self.stacks[key]
            gone = {k for kk, k, _, _ in ended if kk == key}
            stack.unstack()
            stack.slots = [x for k, x in enumerate(stack.slots) if k not in gone]
            self.dirty.add(key)  # rebuilt in _fill, together with the newcomers

    # ---------------------------------------------------------------- one trial to storage

    def _finish(self, stack: Stack, k: int, state: TrialState, reason: str | None) -> None:
        """Close a slot's trial as the standard engine would: same attrs, value, curve, artifacts."""
        x = stack.slots[k]
        live: Live = x.tag
        diverged = reason is not None and reason.startswith("non-finite")
        result = self._result(stack, k, reason if diverged else None) if state == TrialState.COMPLETE or diverged else None
        attrs = result_attrs(result, x.cfg) if result else {}
        if reason:
            attrs["pruned_reason"] = reason
        attrs["worker"] = WORKER
        last = live.values[max(live.values)] if live.values else None
        value = x.best_val if state == TrialState.COMPLETE else last  # Optuna: a pruned trial keeps its last value
        metrics = {"val_mse": x.best_val if state == TrialState.COMPLETE else (last if last is not None else math.inf)}
        if "test_mse" in attrs:
            metrics["test_mse"] = attrs["test_mse"]
        new_best = state == TrialState.COMPLETE and value < self.best_value
        if new_best:
            self.best_value = value
        self._put(live, state, value, attrs, metrics, result.model.cpu() if new_best else None, x.cfg)
        self._tell(live.trial, value if state == TrialState.COMPLETE else None, state)

    def _put(self, live: Live, state: TrialState, value, attrs: dict, metrics: dict, model, tcfg) -> None:
        self.writer.put(Record(
            params=dict(live.trial.params), distributions=dict(live.trial.distributions), values=dict(live.values),
            attrs=attrs, state=state, value=value, started=live.started, completed=datetime.now(),
            epochs=live.epochs, metrics=metrics, model=model, tcfg=tcfg,
        ))

    def _grid_started(self) -> bool:
        return self.cfg.sampler == "grid" and grid_started(self.mirror, self.cfg.space)

    def _tell(self, trial: optuna.Trial, value: float | None, state: TrialState) -> None:
        try:
            self.mirror.tell(trial, value, state=state)
        except RuntimeError as e:  # GridSampler calls study.stop() when its grid is done; the
            if "Study.stop" not in str(e):  # trial's state is already stored (tell's finally)
                raise

    def _result(self, stack: Stack, k: int, reason: str | None) -> TrainResult:
        """What train() returns for this slot, from the stack's best and final weights."""
        x = stack.slots[k]
        live: Live = x.tag
        diverged = reason is not None
        best, final = stack.slot_model(k, "best"), stack.slot_model(k, "final")
        d = self.data
        return TrainResult(
            best_val_mse=x.best_val, best_epoch=x.best_epoch,
            final_val_mse=live.values[max(live.values)] if live.values else math.inf,
            test_mse=mse(best, d.x_test, d.y_test) if x.best_epoch else math.inf,
            final_test_mse=math.inf if diverged else mse(final, d.x_test, d.y_test),
            epochs=x.epoch - 1 if diverged else x.epoch, n_params=n_params(final),
            seconds=(datetime.now() - live.started).total_seconds(), device=str(self.device),
            diverged=reason, model=best,
        )

    def _abandon(self) -> None:
        """Interrupted: write every training trial as FAIL with the curve it has."""
        for stack in self.stacks.values():
            for x in stack.slots:
                live: Live = x.tag
                self._put(live, TrialState.FAIL, None, {"failed_reason": "interrupted", "worker": WORKER}, {}, None, x.cfg)
                self._tell(live.trial, None, TrialState.FAIL)
        self.stacks.clear()
