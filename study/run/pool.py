"""Worker processes: N local workers share one study, and the trial budget is met exactly.

A worker runs one engine: the batched engine (the default: many trials per device) or the
standard engine (`study.optimize`, one trial at a time). Every worker claims each trial from the
shared `Budget` before it starts it, so N workers never start more than --n-trials trials
between them; a slot whose trial was failed by a crash is given back, and the retry runs in it.

The parent of `--workers N` / `--devices ...` starts spawn-context processes, watches them,
replaces one that was killed, forwards SIGINT/SIGTERM and waits for them. A killed standard
worker's trial is failed and retried by the parent; a killed batched worker's writer process
outlives it and does the same for every trial it was training (study.run.batched.writer).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Container
from dataclasses import replace

import optuna
import torch
from optuna.trial import TrialState

from study.config import StudyConfig
from study.run import interrupt
from study.run.batched.engine import run_batched
from study.run.batched.writer import WriterError
from study.run.ledger import give_back
from study.run.opening import Run
from study.run.standard import run_trials
from study.store.recovery import fail_and_retry
from study.trial.attrs import SEED_STREAM

_CTX = mp.get_context("spawn")  # fork after torch/SQLAlchemy have threads is unsafe
# Our queues' and counters' semaphores are registered with multiprocessing's resource tracker,
# which warns about them on stderr when their process is killed: noise after a crash whose
# cleanup sinstudy reports in one line. The tracker starts with this process's -W options.
_QUIET_TRACKER = "ignore::UserWarning:multiprocessing.resource_tracker"
if _QUIET_TRACKER not in sys.warnoptions:
    sys.warnoptions.append(_QUIET_TRACKER)


def _own_resource_tracker() -> None:
    """Let this worker start its own resource tracker, in its own process group.

    A spawned child shares its parent's tracker, which lives in the parent's group: a kill -9 of
    that group (the run, as `kill -9 -PGID` or a job scheduler does) kills the tracker while
    this worker winds down by design, and its queues' semaphores are then reported gone to a
    tracker relaunched without their creation, a KeyError traceback each on the run's stderr.
    The parent's tracker stays open here (its descriptor is not closed): a tracker whose last
    user is gone unlinks what it tracks, the budget's semaphores among them, and a writer this
    worker starts after its parent died could no longer open them.
    Leans on CPython's private `_fd`/`_pid` (tests/test_shared_trust.py fails if they change)."""
    from multiprocessing import resource_tracker

    tracker = resource_tracker._resource_tracker
    tracker._fd = tracker._pid = None


def worker_seed(cfg: StudyConfig, index: int, n_workers: int, generation: int) -> int:
    """Each worker its own sampler seed: identical seeds would make parallel workers propose
    identical params. A replacement worker gets a fresh one, so it does not re-propose what
    the worker it replaces proposed. Worker 0 of the first generation keeps the study seed.
    The samplers then add the number of trials the study holds (a resumed study must not
    replay its first points): the streams are spaced so that the sums never meet."""
    return cfg.seed + (index + n_workers * generation) * SEED_STREAM


def _batched(run: Run, seed: int, stream: int, index: int, on_trial, on_start, on_writer):
    return run_batched(
        run, seed=seed, on_trial=on_trial, on_writer=on_writer, worker=index, stream=stream
    )


def _standard(run: Run, seed: int, stream: int, index: int, on_trial, on_start, on_writer):
    start = time.perf_counter()
    callbacks = [on_trial] if on_trial else []
    objective = run_trials(run, seed=seed, on_start=on_start, callbacks=callbacks, worker=index)
    # everything outside the objective (ask, tell, sampler) plus its reporting and pruning
    return (time.perf_counter() - start) - objective.seconds_inside + objective.seconds_reporting


# `--engine` -> how one process runs it until the budget is spent; returns its bookkeeping
# seconds (what is not training)
ENGINES = {"batched": _batched, "standard": _standard}


def run_engine(
    run: Run,
    *,
    seed: int,
    stream: int = 0,
    running: mp.Array | None = None,
    writers: mp.Array | None = None,
    index: int = 0,
    on_trial: Callable | None = None,
) -> float | None:
    """Run this process's engine (worker `index`; its trials' seeds counted in `stream`) until
    the budget is spent. Returns its bookkeeping seconds. `running[index]`: the standard
    engine's running trial; `writers[index]`: the batched engine's writer process."""

    def on_start(number: int) -> None:
        if running is not None:
            running[index] = number

    def on_writer(pid: int) -> None:
        if writers is not None:
            writers[index] = pid

    engine = ENGINES[run.cfg.engine]
    return engine(run, seed, stream, index, on_trial, on_start, on_writer)


def _worker_main(
    run: Run,
    index: int,
    seed: int,
    stream: int,
    running: mp.Array,
    writers: mp.Array,
    threads: int,
    parent: int,
) -> None:
    """Entry point of a spawned worker: exit 0 done, 128+signal interrupted, 1 error.

    It runs in a process group of its own, so a terminal's Ctrl-C (sent to the run's group)
    reaches only the parent, which forwards it once: a worker that got it twice took the second
    for "stop now" and left its trials to its writer's crash path (FAIL and retry). SIGINT and
    SIGTERM are blocked from its start (Pool._start) until its handlers are in place."""
    os.setpgrp()
    _own_resource_tracker()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # see runner.run
    torch.set_num_threads(threads)
    _stop_with_parent(parent)  # not getppid(): the parent may have died while this one started
    try:
        with interrupt.handle_signals():
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            run_engine(
                run, seed=seed, stream=stream, running=running, writers=writers, index=index
            )
            if interrupt.requested():  # arrived between trials
                sys.exit(128 + interrupt.requested())
            run.budget.ended()
    except interrupt.Interrupted as e:
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        sys.exit(130)
    except WriterError as e:  # its trials were failed and retried: the parent replaces it
        print(f"sinstudy: worker {index}: {e}", file=sys.stderr)
        sys.exit(WRITER_DIED)
    except Exception as e:  # one line for the user; the parent stops the run
        line = run.store.fault(e) or f"{type(e).__name__}: {e}"
        print(f"sinstudy: worker {index}: {line}", file=sys.stderr)
        sys.exit(1)


class WorkerError(RuntimeError):
    pass


_SIGNALS = {signal.SIGINT, signal.SIGTERM}
WRITER_DIED = 75  # a worker's exit code when its storage writer process died


def _stop_with_parent(parent: int) -> None:
    """A worker whose parent was killed (kill -9) stops as if told to: its trials end FAIL,
    stored by its writer, instead of training on with nobody to wait for them."""

    def watch() -> None:
        while os.getppid() == parent:  # a parent gone before this started: at once
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class Pool:
    """The parent's side of `--workers N` / `--devices ...`."""

    def __init__(self, run: Run, *, say: Callable[[str], None], on_progress: Callable[[], None]):
        self.opened, self.cfg, self.placements = run, run.cfg, run.placements
        placements = run.placements
        self.study = run.load_study()
        self.say, self.on_progress = say, on_progress
        self.budget = run.budget
        # per worker: a standard engine's running trial, a batched engine's writer process
        self.running = _CTX.Array("i", [-1] * len(placements))
        self.writers = _CTX.Array("i", [-1] * len(placements))
        self.procs: dict[int, mp.Process] = {}
        self.workers: set[str] = set()  # every worker process's `worker` attr
        self.generation = [0] * len(placements)
        cpu_workers = sum(dev == "cpu" for dev, _ in placements)
        # cores split between CPU workers
        self.threads = max(1, (os.cpu_count() or 1) // max(1, cpu_workers))
        self.signum = 0

    def _start(self, i: int) -> None:
        device, env = self.placements[i]
        stream = i + len(self.placements) * self.generation[i]
        seed = worker_seed(self.cfg, i, len(self.placements), self.generation[i])
        self.generation[i] += 1
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # a spawned child copies the environment at start
        # blocked across the start: the child inherits the mask (see _worker_main)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            p = _CTX.Process(
                target=_worker_main,
                args=(
                    replace(self.opened, device=torch.device(device)),
                    i,
                    seed,
                    stream,
                    self.running,
                    self.writers,
                    self.threads,
                    os.getpid(),
                ),
                name=f"sinstudy-worker-{i}",
            )
            p.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.procs[i] = p
        # as trial_attrs.WORKER in that process
        self.workers.add(f"{socket.gethostname()}:{p.pid}")

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
        held, writer = self.running[i], self.writers[i]
        if code == 0 or self.signum:
            return None
        if code == WRITER_DIED:
            self.say(
                f"worker {i}'s storage writer died; its trials are retried; starting a replacement"
            )
            self._start(i)
            return None
        if code < 0:  # killed by a signal we did not send: fail its trials, retry them, replace it
            self.running[i] = self.writers[i] = -1
            name = signal.Signals(-code).name
            if self.cfg.engine == "batched":
                # Its writer stores what it was handed, fails and requeues the rest and gives
                # their budget back: the replacement starts once that is done, so it finds them.
                self.say(
                    f"worker {i} was killed ({name}); its writer fails and requeues its trials; "
                    f"starting a replacement"
                )
                _wait_gone(writer, timeout=self.cfg.grace_period + 30)
            elif held >= 0 and fail_and_retry(
                self.opened.store, self.study, held, self.cfg.max_retries
            ):
                retries = self.cfg.max_retries
                give_back(self.budget, "orphaned", retries=retries, reserves=False, worker=i)
                self.say(
                    f"worker {i} was killed ({name}); trial #{held} marked FAIL"
                    f"{' and queued for retry' if self.cfg.max_retries else ''}; starting a "
                    f"replacement"
                )
            self._start(i)
            return None
        self.budget.stop()
        for p in self.procs.values():
            p.terminate()
        return (
            f"worker {i} stopped with exit code {code} (its message is above); the study is "
            f"unchanged otherwise"
        )

    def _fail_orphans(self) -> None:
        """After an interrupt, a trial whose worker died without telling Optuna is marked FAIL."""
        if self.cfg.engine == "batched":  # their writers do it
            return
        for i, trial in enumerate(self.running):
            if trial >= 0:
                fail_and_retry(self.opened.store, self.study, trial, max_retries=0)
                self.running[i] = -1


def _wait_gone(pid: int, timeout: float) -> None:
    """Until process `pid` has exited (a zombie counts as gone: nobody may reap it)."""
    deadline = time.time() + timeout
    while pid > 0 and time.time() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except OSError:
            return
        time.sleep(0.1)


def finished_since(study: optuna.Study, before: Container[int]) -> int:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    return sum(t.number not in before for t in done)
