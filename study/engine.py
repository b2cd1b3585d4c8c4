"""The batched engine: K trials train at once in `Stack`s; Optuna decides from an in-memory mirror.

Bookkeeping is the cost here, not arithmetic: on SQLite, report() + should_prune() take ~5 ms
per trial per epoch, more than an epoch of a whole stack. So the sampler and the pruner run on an
in-memory copy of the study (`mirror`, seeded with the stored study's finished trials), where
ask/report/should_prune cost ~0.1 ms, and each trial reaches the real storage once, when it ends,
in three writes: the trial with its params, every epoch's intermediate value and its user attrs
(one transaction), its artifacts when it is a new best, and its final state. What lands in
storage is what the standard engine writes: the same params, curves, user attrs, TensorBoard run
and best-model artifacts. A crash or kill loses only the trials still training (never written);
the study is never half-written. Ctrl-C / SIGTERM write those trials as FAIL with their curves.

A pruned, diverged or finished slot is replaced at the next epoch by a newly asked trial (fresh
weights, reset optimizer state), so the device never idles while the budget lasts.
"""

from __future__ import annotations

import math
import queue
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore
from optuna.trial import FrozenTrial, TrialState

from . import interrupt
from .batched import Slot, Stack, new_slot
from .config import StudyConfig
from .data import make_data
from .model import n_params
from .objective import WORKER, result_attrs, trial_seed, upload_model
from .space import grid_started, suggest
from .tracking import TrialLogger, run_dir
from .train import EpochLog, TrainResult, lr_at, mse

DEFAULT_SLOTS = {"cpu": 64, "cuda": 1024}


@dataclass
class Live:
    """What the engine keeps for a slot's trial while it trains."""

    trial: optuna.Trial  # in the mirror
    logger: TrialLogger
    started: datetime
    values: dict[int, float] = field(default_factory=dict)  # epoch -> validation MSE


@dataclass
class Stats:
    book_seconds: float = 0.0  # sampler, pruner and TensorBoard in the training loop's thread
    # (storage writes run on the writer thread, overlapping training: not counted here)


class _Writer:
    """Writes finished trials to storage on a thread of its own, so SQLite's ~50 ms per trial
    overlaps training instead of stalling it. `close()` drains the queue: a run returns only
    when every finished trial is stored; a crash loses at most the queued ones."""

    def __init__(self, engine: "BatchedEngine"):
        self.engine = engine
        self.queue: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="sinstudy-writer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def put(self, item: tuple) -> None:
        self.queue.put(item)

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.engine.write(*item)
                except BaseException as e:  # reported in the training thread
                    self.error = e

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        self.raise_if_failed()


def _key(slot: Slot) -> tuple[str, int]:
    """Stack by optimizer kind and width class. Up to 64 units a step costs overhead, not
    arithmetic, so one class holds them all; wider models go by the next power of two, where
    padding a 100-unit model to 256 would double its arithmetic."""
    w = max(slot.cfg.widths)
    return slot.cfg.optimizer, 64 if w <= 64 else 1 << (w - 1).bit_length()


class BatchedEngine:
    def __init__(self, cfg: StudyConfig, study: optuna.Study, device: torch.device, *, slots: int,
                 on_trial: callable = lambda frozen: None):
        self.cfg, self.study, self.device, self.k = cfg, study, device, slots
        self.on_trial = on_trial
        self.data = make_data(cfg.data, device)
        self.store = FileSystemArtifactStore(cfg.artifact_dir)
        self.stacks: dict[tuple[str, int], Stack] = {}
        self.stats = Stats()
        self.writer = _Writer(self)
        self.dirty: set[tuple[str, int]] = set()  # stacks whose slots changed since their build
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
        """Train until the budget is spent. Returns the interrupting signal, or 0."""
        self.writer.start()
        try:
            while True:
                self._fill(budget)
                if not self.stacks:
                    return interrupt.requested()
                for key, stack in list(self.stacks.items()):
                    loss, val = stack.train_epoch()
                    self._after_epoch(key, stack, loss.tolist(), val.tolist())  # one sync per stack per epoch
                if interrupt.requested():
                    self._abandon()
                    return interrupt.requested()
                self.writer.raise_if_failed()
        finally:
            self.writer.close()  # every finished trial is in storage before we return

    def _fill(self, budget) -> None:
        live = sum(len(s.slots) for s in self.stacks.values())
        new: dict[tuple[str, int], list[Slot]] = {}
        t0 = time.perf_counter()
        while live < self.k and not interrupt.requested() and not self._grid_started() and budget.claim():
            trial = self.mirror.ask()
            tcfg = suggest(trial, self.cfg.space, self.cfg.train, seed=trial_seed(self.cfg, trial.number))
            pending = Path(self.cfg.log_dir) / self.cfg.study / f"pending-{uuid.uuid4().hex[:12]}"
            slot = new_slot(tcfg, self.device, tag=Live(trial, TrialLogger("", "", 0, path=pending), datetime.now()))
            new.setdefault(_key(slot), []).append(slot)
            live += 1
        self.stats.book_seconds += time.perf_counter() - t0
        # One restack per changed stack per epoch: the slots that left (already unstacked in
        # _after_epoch) and the ones that arrive are applied together.
        for key in set(new) | self.dirty:
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

    def _after_epoch(self, key, stack: Stack, loss: list[float], val: list[float]) -> None:
        improved = [v < x.best_val for v, x in zip(val, stack.slots)]
        if any(improved):
            stack.keep_best(torch.tensor(improved, device=self.device))
        t0 = time.perf_counter()
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
            live.logger.log_epoch(EpochLog(x.epoch, loss[k], val[k], lr_at(x.cfg, x.epoch - 1)))
            live.trial.report(val[k], x.epoch)
            if live.trial.should_prune():
                done.append((k, TrialState.PRUNED, f"pruner stopped it after epoch {x.epoch}"))
            elif x.epoch >= x.cfg.max_epochs:
                done.append((k, TrialState.COMPLETE, None))
        for k, state, reason in done:
            self._finish(stack, k, state, reason)
        self.stats.book_seconds += time.perf_counter() - t0
        if done:
            gone = {k for k, _, _ in done}
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
        live.logger.close(dict(live.trial.params), metrics)
        new_best = state == TrialState.COMPLETE and value < self.best_value
        if new_best:
            self.best_value = value
        self.writer.put((live, state, value, attrs, result.model.cpu() if new_best else None, x.cfg))
        self._tell(live.trial, value if state == TrialState.COMPLETE else None, state)

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

    def write(self, live: Live, state: TrialState, value, attrs: dict, model, cfg) -> None:
        """The trial in the real storage (writer thread): one transaction with params, curve and
        attrs; its artifacts when it was a new best; then its final state; then its TB run name."""
        storage = self.study._storage
        template = FrozenTrial(
            number=0, state=TrialState.RUNNING, value=None, datetime_start=live.started, datetime_complete=None,
            params=live.trial.params, distributions=live.trial.distributions, user_attrs=attrs, system_attrs={},
            intermediate_values=live.values, trial_id=0,
        )
        trial_id = storage.create_new_trial(self.study._study_id, template_trial=template)
        if model is not None:
            number = storage.get_trial_number_from_id(trial_id)
            artifact = upload_model(self.store, storage.get_trial(trial_id), number, model, cfg, storage)
            storage.set_trial_user_attr(trial_id, "model_artifact", artifact)
        storage.set_trial_state_values(trial_id, state, None if value is None else [value])
        frozen = storage.get_trial(trial_id)
        live.logger.move_to(run_dir(self.cfg.log_dir, self.cfg.study, frozen.number))
        self.on_trial(frozen)

    def _abandon(self) -> None:
        """Interrupted: write every training trial as FAIL with the curve it has."""
        for stack in self.stacks.values():
            for x in stack.slots:
                live: Live = x.tag
                live.logger.close(dict(live.trial.params), {})
                self.writer.put((live, TrialState.FAIL, None, {"failed_reason": "interrupted", "worker": WORKER}, None, x.cfg))
                self._tell(live.trial, None, TrialState.FAIL)
        self.stacks.clear()
