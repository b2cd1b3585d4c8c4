"""Worker processes: N local workers share one study, and the trial budget is met exactly.

Every worker (the single in-process one too) runs the same loop: claim a slot from the shared
`Budget`, run one trial through `study.optimize(n_trials=1)` (so Optuna's heartbeat, stale-trial
sweep and WAITING-trial queue work as documented), repeat. A slot is claimed before the trial
exists, so N workers never start more than --n-trials trials between them; a slot whose worker
was killed is given back after its trial is failed, and the retry runs in that slot.

The parent of `--workers N` (N > 1) starts spawn-context processes, watches them, replaces one
that was killed (its trial FAIL, params retried), forwards SIGINT/SIGTERM and waits for them.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import replace

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import JournalStorage
from optuna.trial import TrialState

from . import interrupt
from . import storage as storage_mod
from .config import StudyConfig
from .data import make_data
from .objective import Objective
from .recovery import JournalHeartbeat, fail_and_retry, sweep_stale
from .space import grid_started

_CTX = mp.get_context("spawn")  # fork after torch/SQLAlchemy have threads is unsafe


class Budget:
    """Trials this run may still start, shared by the local workers (exact across them)."""

    def __init__(self, n_trials: int, timeout: float | None):
        self.n_trials = n_trials
        self.deadline = None if timeout is None else time.time() + timeout
        self._claimed = _CTX.Value("i", 0)
        self._stopped = _CTX.Value("b", 0)

    def claim(self) -> bool:
        with self._claimed.get_lock():
            if self._stopped.value or self._claimed.value >= self.n_trials:
                return False
            if self.deadline is not None and time.time() >= self.deadline:
                return False
            self._claimed.value += 1
            return True

    def release(self) -> None:
        with self._claimed.get_lock():
            self._claimed.value -= 1

    def stop(self) -> None:
        self._stopped.value = 1


def open_study_storage(cfg: StudyConfig, parsed: storage_mod.StorageURL | None = None) -> optuna.storages.BaseStorage:
    """The study's storage with the heartbeat settings of the config (parent and workers alike)."""
    hb = storage_mod.Heartbeat(cfg.heartbeat_interval, cfg.grace_period, cfg.max_retries)
    return storage_mod.open_storage(parsed or storage_mod.parse(cfg.storage), hb)


def worker_loop(
    cfg: StudyConfig,
    index: int,
    budget: Budget,
    current: "mp.Array",
    *,
    device: str,
    callbacks: list[Callable] = (),
    storage: optuna.storages.BaseStorage | None = None,
) -> Objective:
    """Claim, run one trial, repeat. `current[index]` holds the running trial's number.
    `storage`: the caller's, when it runs in the caller's process; else opened here."""
    from .runner import make_pruner, make_sampler  # runner imports this module

    storage = storage or open_study_storage(cfg)
    # Each worker its own sampler seed: identical seeds would make parallel workers ask for
    # identical params at the same moment. Worker 0 keeps the study seed (single-process runs).
    sampler = make_sampler(replace(cfg, seed=cfg.seed + index))
    study = optuna.load_study(study_name=cfg.study, storage=storage, sampler=sampler, pruner=make_pruner(cfg))
    data = make_data(cfg.data, device)
    objective = Objective(cfg, data, FileSystemArtifactStore(cfg.artifact_dir))
    journal = isinstance(storage, JournalStorage)

    def run_one(trial: optuna.Trial) -> float:
        current[index] = trial.number
        if journal:
            with JournalHeartbeat(study, trial, cfg.heartbeat_interval):
                return objective(trial)
        return objective(trial)

    def grid_done() -> bool:
        return cfg.sampler == "grid" and grid_started(study, cfg.space)

    while not interrupt.requested() and not grid_done() and budget.claim():
        if journal:  # RDB storages: study.optimize runs Optuna's own stale-trial sweep
            sweep_stale(study, grace_period=cfg.grace_period, max_retries=cfg.max_retries)
        study.optimize(run_one, n_trials=1, callbacks=list(callbacks))
        current[index] = -1
    return objective


def _worker_main(cfg: StudyConfig, index: int, budget: Budget, current: "mp.Array", device: str) -> None:
    """Entry point of a spawned worker: exit 0 done, 128+signal interrupted, 1 error."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # see runner.run
    try:
        with interrupt.handle_signals():
            worker_loop(cfg, index, budget, current, device=device)
            if interrupt.requested():  # arrived between trials
                sys.exit(128 + interrupt.requested())
    except interrupt.Interrupted as e:
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # one line for the user; the parent stops the run
        print(f"sinstudy: worker {index}: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)


class WorkerError(RuntimeError):
    pass


def worker_devices(cfg: StudyConfig, device: str) -> list[tuple[str, dict[str, str]]]:
    """(device, extra environment) per worker: with --devices each worker sees only its card."""
    if cfg.devices is None:
        return [(device, {})] * cfg.workers
    n = max(cfg.workers, len(cfg.devices))
    return [("cuda:0", {"CUDA_VISIBLE_DEVICES": str(cfg.devices[i % len(cfg.devices)])}) for i in range(n)]


class Pool:
    """The parent's side of `--workers N`."""

    def __init__(self, cfg: StudyConfig, study: optuna.Study, placements: list[tuple[str, dict[str, str]]],
                 *, say: Callable[[str], None], on_progress: Callable[[], None]):
        self.cfg, self.study, self.placements = cfg, study, placements
        self.say, self.on_progress = say, on_progress
        self.budget = Budget(cfg.n_trials, cfg.timeout)
        self.current = _CTX.Array("i", [-1] * len(placements))
        self.procs: dict[int, mp.Process] = {}
        self.signum = 0

    def _start(self, i: int) -> None:
        device, env = self.placements[i]
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # a spawned child copies the environment at start
        try:
            p = _CTX.Process(target=_worker_main, args=(self.cfg, i, self.budget, self.current, device), name=f"sinstudy-worker-{i}")
            p.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.procs[i] = p

    def _on_signal(self, signum: int, frame: object) -> None:
        if not self.signum:
            self.signum = signum
            self.budget.stop()
        for p in self.procs.values():
            if p.pid is not None and p.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signum)

    def run(self) -> int:
        """Run to the end of the budget. Returns the signal that interrupted it, or 0."""
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        error = None
        try:
            for i in range(len(self.placements)):
                self._start(i)
            while self.procs:
                time.sleep(0.2)
                self.on_progress()
                for i, p in list(self.procs.items()):
                    if p.exitcode is None:
                        continue
                    del self.procs[i]
                    error = error or self._on_exit(i, p.exitcode)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        self._fail_orphans()
        self.on_progress()
        if error and not self.signum:
            raise WorkerError(error)
        return self.signum

    def _on_exit(self, i: int, code: int) -> str | None:
        trial = self.current[i]
        if code == 0 or self.signum:
            return None
        if code < 0:  # killed by a signal we did not send: fail its trial, retry, replace it
            self.current[i] = -1
            if trial >= 0 and fail_and_retry(self.study, trial, self.cfg.max_retries):
                self.budget.release()
                self.say(f"worker {i} was killed ({signal.Signals(-code).name}); trial #{trial} marked FAIL"
                         f"{' and queued for retry' if self.cfg.max_retries else ''}")
            self._start(i)
            return None
        self.budget.stop()
        for p in self.procs.values():
            p.terminate()
        return f"worker {i} stopped with exit code {code} (its message is above); the study is unchanged otherwise"

    def _fail_orphans(self) -> None:
        """After an interrupt, a trial whose worker died without telling Optuna is marked FAIL."""
        for i, trial in enumerate(self.current):
            if trial >= 0:
                fail_and_retry(self.study, trial, max_retries=0)
                self.current[i] = -1


def finished_since(study: optuna.Study, before: set[int]) -> int:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    return sum(t.number not in before for t in done)

