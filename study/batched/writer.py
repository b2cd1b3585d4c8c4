"""The batched engine's storage I/O, in a process of its own: the trainer never waits on storage.

What the writer does, in the order the trainer hands it over (one queue):
  - `Start`: a trial the engine has just asked is created RUNNING in storage (params,
    distributions, the sampler's system attrs, `engine`/`seed`/`worker` user attrs, a heartbeat),
    all of one fill in one transaction, numbered in start order. A WAITING trial the engine
    took from Optuna's queue (enqueue_trial, retries) is claimed atomically, as Optuna's ask()
    claims it; if another engine was first, or another engine already trains the same parameter
    set, the trainer is told (`lost`) and drops the slot;
  - intermediate values, flushed by the trainer about once a second, in one transaction;
  - `Finish`: a new best's weights and fit image are uploaded as artifacts (the trial is still
    RUNNING: Optuna takes none on finished trials), then its state, value, remaining values
    and attrs in one transaction, then its TensorBoard run with each epoch's original time.
Between jobs: the trials other engines stored (sent to the trainer's mirror, `SYNC_S`), and the
stale-trial sweep that fails and retries trials of dead runs (`grace_period`). The heartbeat of
every trial it holds (`heartbeat_interval`) comes from a thread, as Optuna's does for
study.optimize: beaten between jobs, a long job (a 2,000-epoch trial's TensorBoard run on a loaded
machine) let a live trial look dead to the other engines' sweeps.

Why a process and not a thread: every torch op releases the GIL and takes it back when its
kernel is done. While a writer *thread* ran Python (SQLAlchemy, TensorBoard, matplotlib), each
take-back waited up to the interpreter's switch interval for a kernel far shorter than it, and
the training loop slowed by a multiple (docs/design.md).

Crashes. The writer ignores SIGINT/SIGTERM (a Ctrl-C reaches the whole process group): the
trainer decides what an interrupt means and the writer drains its queue. If the trainer dies,
the writer stores what it was handed, then fails the trials it still holds and queues their
retries (`max_retries`), at once rather than after the grace period. If the writer dies, the
trainer fails and retries the trials it had stored and stops with one line (a worker of
`--workers N` is then replaced). Everything handed over is plain data (weights as
arrays), so the writer can store it after the trainer is gone.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import JournalStorage
from optuna.trial import FrozenTrial, TrialState

from ..artifacts import State, upload_model
from ..config import StudyConfig, TrainConfig
from ..dashboard import publish
from ..opening import open_study_storage
from ..recovery import HEARTBEAT_ATTR, OWNER_ATTR, fail_and_retry, owner_attr, sweep_stale
from ..space import param_set
from ..tracking import TrialLogger
from ..train import EpochLog
from .bulk import (
    Ending,
    Taken,
    add_trials,
    append_values,
    beat,
    finish_trials,
    trial_states,
)
from .sync import SYNC_S, Changes

_SIGNALS = {signal.SIGINT, signal.SIGTERM}
# Ended trials stored in one transaction at most: a GPU engine ends hundreds at one epoch (the
# first rung of Hyperband), one transaction each kept the writer behind.
FINISH_BATCH = 256
# A writer whose loop has not come round for this long stops beating: its trials go stale and
# other engines recover them, as they would a dead writer's.
STUCK_S = 60.0


@dataclass
class Start:
    key: int  # the engine's handle for the trial (its number in the engine's mirror)
    trial: FrozenTrial  # RUNNING: params, distributions, user and system attrs, datetime_start
    claim: int | None = None  # storage trial_id of a WAITING trial to take; None: a new trial
    seed: int | None = None  # its weight seed, unique in the study (None: shared on purpose)


@dataclass
class Finish:
    """One ended trial as the engine hands it over (plain data: no storage or tensor handles)."""

    key: int
    state: TrialState
    value: float | None
    values: dict[int, float]  # intermediate values not flushed yet
    attrs: dict
    system_attrs: dict  # the pruner's (rungs), for other engines' pruners
    completed: datetime
    # TensorBoard points, wall time
    epochs: list[tuple[EpochLog, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # TensorBoard HParams metrics
    model: State | None = None  # a new best's weights, stored as an artifact
    tcfg: TrainConfig | None = None


@dataclass(frozen=True)
class Known:
    """The stored trials the engine's mirror was loaded with (trial ids)."""

    max_id: int
    unfinished: dict[int, TrialState]  # RUNNING / WAITING trials of others
    seeds: frozenset[int] = frozenset()  # weight seeds the stored trials used
    incomplete: frozenset[int] = frozenset()  # RUNNING trials stored without params or seed
    params: frozenset[frozenset] = frozenset()  # parameter sets of the stored trials (not FAIL)
    best: float = math.inf  # the best value of the stored COMPLETE trials


class WriterError(RuntimeError):
    """The writer process failed; its message is one line (the CLI prints it)."""


class Writer:
    """The trainer's side: put(), poll() what came back, close() at the end."""

    def __init__(self, cfg: StudyConfig, known: Known, budget=None, *, worker: int = 0):
        ctx = mp.get_context("spawn")  # no fork: the trainer has torch's thread pools running
        self.jobs, self.results = ctx.Queue(), ctx.Queue()
        # Budget claims the trainer has made: the writer gives back those of trials it could not
        # store, and, if the trainer dies, those it never received.
        self.claims = ctx.Value("i", 0)
        self.proc = ctx.Process(
            target=_main,
            args=(
                cfg,
                known,
                self.jobs,
                self.results,
                os.getpid(),
                _Claims(budget, self.claims, worker),
            ),
            name="sinstudy-writer",
        )
        # Signals blocked across the start: the child inherits the mask, ignores both signals
        # first thing, then unblocks, so a Ctrl-C during its start-up cannot kill it.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            self.proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self._closed = False

    def claimed(self) -> None:
        """The trainer claimed one trial of the budget (before handing the trial over)."""
        with self.claims.get_lock():
            self.claims.value += 1

    def put(self, job) -> None:
        self.jobs.put(job)

    def poll(self) -> list[tuple]:
        """Messages since the last poll (never waits). Raises WriterError if the writer died."""
        out = []
        while True:
            try:
                msg = self.results.get_nowait()
            except queue.Empty:
                break
            out.append(self._check(msg))
        if not out and not self.proc.is_alive():
            self._died()
        return out

    def close(self, *, publish: bool) -> list[tuple]:
        """Wait until every job put so far is done (and the note written if `publish`).
        The close message goes first: if this wait is interrupted (a second Ctrl-C), the writer
        still drains and exits by itself, and the interpreter's exit waits for it."""
        if self._closed:
            return []
        self._closed = True
        self.jobs.put(("close", publish))
        out = []
        while True:
            try:
                msg = self.results.get(timeout=1.0)
            except queue.Empty:
                if not self.proc.is_alive():
                    self._died()
                continue
            if msg[0] == "closed":
                break
            out.append(self._check(msg))
        self.proc.join()
        return out

    def _died(self):
        # Nothing reads the queue any more: without this, the interpreter's exit would wait
        # forever for its feeder thread to flush into a full pipe.
        self.jobs.cancel_join_thread()
        self._closed = True
        raise WriterError(
            f"the storage writer process died (exit code {self.proc.exitcode}); the trials it "
            "held are marked FAIL and queued for retry"
        )

    @staticmethod
    def _check(msg: tuple) -> tuple:
        if msg[0] == "error":
            raise WriterError(msg[1])
        return msg


class _Claims:
    """The writer's side of the budget: claims it gives back (the budget may be None in tests)."""

    def __init__(self, budget, claims, worker: int = 0):
        self.budget, self.claims, self.worker = budget, claims, worker

    def give_back(self, n: int, *, for_queued: bool = False) -> None:
        if n <= 0:
            return
        with self.claims.get_lock():
            self.claims.value -= n
        if self.budget is not None:
            self.budget.release(n, for_queued=for_queued, worker=self.worker)


# ------------------------------------------------------------------------ the writer process


def _main(
    cfg: StudyConfig, known: Known, jobs: mp.Queue, results: mp.Queue, parent: int, claims: _Claims
) -> None:
    for s in _SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    import torch

    # the trainer has the cores; this process draws one small image at most
    torch.set_num_threads(1)
    sink: _Sink | None = None  # None once it has failed: later jobs are drained, not written
    try:
        sink = _Sink(cfg, known, results, claims)
    except BaseException as e:
        results.put(("error", _one_line(e)))
    # This process never puts jobs: closing its copy of the pipe's sending end means a trainer
    # killed in the middle of a put leaves an EOF here, not a read that waits forever.
    jobs._writer.close()
    close, orphaned = None, False
    ahead: deque = deque()  # a job read while gathering finishes, handled next
    while True:
        try:
            if ahead:
                item = ahead.popleft()
            else:
                item = jobs.get_nowait() if close else jobs.get(timeout=0.2)
        except (EOFError, OSError):  # the trainer died mid-put: nothing more will come
            if close:
                break
            close, orphaned = ("close", False), True
            continue
        except queue.Empty:
            if close:
                break
            if os.getppid() != parent:  # the trainer died: store what is queued, then go
                close, orphaned = ("close", False), True
                continue
            if sink is not None:  # the first idle moment
                sink.warm_up.start()
            item = None
        if isinstance(item, Finish):  # with the finishes queued behind it: one transaction
            batch = [item]
            while len(batch) < FINISH_BATCH:
                try:
                    nxt = ahead.popleft() if ahead else jobs.get_nowait()
                except (queue.Empty, EOFError, OSError):  # EOF: the next get sees it again
                    break
                if not isinstance(nxt, Finish):
                    ahead.append(nxt)
                    break
                batch.append(nxt)
            if sink is not None:
                sink = _guarded(sink, results, sink.finish_all, batch)
        elif isinstance(item, tuple):
            close = item
        elif item is not None and sink is not None:
            sink = _guarded(sink, results, sink.handle, item)
        if sink is not None and not close:
            sink = _guarded(sink, results, sink.periodic)
    if sink is not None and orphaned:
        sink = _guarded(sink, results, sink.fail_held)
    if sink is not None and close[1]:
        _guarded(sink, results, sink.publish)
    if orphaned:  # nobody reads the results any more: a full pipe must not keep this process
        results.cancel_join_thread()
    else:
        results.put(("closed",))
        results.close()
        results.join_thread()  # the message is in the pipe
    # Everything is committed and closed; skip the interpreter's slow teardown of torch,
    # SQLAlchemy and matplotlib, which the trainer would otherwise wait for.
    os._exit(0)


def _upload_order(held: tuple) -> tuple[bool, float]:
    f = held[0]
    return (f.model is None, f.value if f.model is not None else 0.0)


def _guarded(sink: _Sink, results: mp.Queue, fn, *args) -> _Sink | None:
    try:
        fn(*args)
        return sink
    except BaseException as e:
        results.put(("error", _one_line(e)))
        return None


class _WarmUp:
    """The imports a trial's end (TensorBoard), a new best (matplotlib) and the note need, done
    at the writer's first idle moment in a thread: on a loaded machine they take seconds, and a
    loop doing them stored no curves that long. The loop waits for the thread before it needs them
    itself: two threads importing plotly's modules at once deadlocked (Python detects it and
    raises in one of them)."""

    def __init__(self):
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._imports, name="warm-up", daemon=True)
            self.thread.start()

    def wait(self) -> None:
        if self.thread is None:  # no idle moment yet: import here, and no thread ever
            self.thread = threading.current_thread()
            self._imports()
        elif self.thread is not threading.current_thread():
            self.thread.join()

    @staticmethod
    def _imports() -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot  # noqa: F401
            import optuna_dashboard  # noqa: F401
            import tensorboard.plugins.hparams.api_pb2  # noqa: F401
            import torch.utils.tensorboard.summary  # noqa: F401

            from .. import plots  # noqa: F401  (plotly)
        except Exception:  # the job that needs them imports them again and reports the failure
            pass


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"storage writer: {type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


class _Sink:
    """The writer process's storage, artifact store, TensorBoard folder and the trials it holds."""

    def __init__(self, cfg: StudyConfig, known: Known, results: mp.Queue, claims: _Claims):
        self.cfg, self.results, self.claims = cfg, results, claims
        self.storage = open_study_storage(cfg)
        self.journal = isinstance(self.storage, JournalStorage)
        try:
            self.study_id = self.storage.get_study_id_from_name(cfg.study)
        except KeyError:  # Optuna says only "Record does not exist."
            raise LookupError(
                f"study {cfg.study!r} is not in {cfg.storage} (deleted while the run started?)"
            ) from None
        self.study = optuna.load_study(study_name=cfg.study, storage=self.storage)
        self.store = FileSystemArtifactStore(cfg.artifact_dir)
        self.ids: dict[int, int] = {}  # engine key -> trial_id, while the trial runs
        self.numbers: dict[int, int] = {}  # trial_id -> number, while it runs
        self.params: dict[int, dict] = {}  # trial_id -> params, while it runs
        self.own: set[int] = set()  # trial ids this engine started
        self.held_ever = 0  # trials stored for the trainer: each used one of its budget claims
        self.changes = Changes(known.max_id, known.unfinished)  # what the mirror has seen
        # parameter sets of every trial of others this writer has seen (FAIL ones excepted)
        self.taken_params = set(known.params)
        self.params_seen: set[int] = set()  # others' trials whose params are in taken_params
        self.best = known.best  # the best stored value seen: a new best's weights are uploaded
        self.seeds = set(known.seeds)  # weight seeds of every trial this writer has seen
        # others' running trials seen without their params or seed yet (the standard engine
        # stores them after creating the trial): the storage checks them again at each start
        self.incomplete = set(known.incomplete)
        self.owner = owner_attr()
        now = time.monotonic()
        # the first sweep soon: a replaced worker's trials are recovered by the next one here
        self.due = {"sync": now + SYNC_S, "sweep": now + min(SYNC_S, cfg.grace_period)}
        self.lock = threading.Lock()  # self.ids, shared with the heartbeat thread
        self.looped = now  # when the loop last came round (the heartbeat's proof of life)
        self.beat_error: BaseException | None = None
        self.warm_up = _WarmUp()
        threading.Thread(target=self._beat, name="heartbeat", daemon=True).start()

    # ---------------------------------------------------------------- jobs

    def handle(self, item) -> None:
        if isinstance(item, list):
            self.start(item)
        elif isinstance(item, dict):
            self.values(item)
        else:
            self.finish(item)

    def start(self, starts: list[Start]) -> None:
        for s in starts:
            s.trial.system_attrs[OWNER_ATTR] = self.owner
            if self.journal:  # the journal's heartbeat is a system attr, beaten from the start
                s.trial.system_attrs[HEARTBEAT_ATTR] = time.time()
        new = [s for s in starts if s.claim is None]
        if new:
            # Every parameter set and seed of others seen (the storage checks what it holds
            # after the last sync, under its lock): a new trial repeats none. A sampler can
            # propose a point it knows (two runs on one study whose samplers were seeded
            # alike drew the same first point), so what the mirror holds counts too.
            taken = Taken(frozenset(self.taken_params), frozenset(self.seeds))
            stored = add_trials(
                self.storage,
                self.study_id,
                [s.trial for s in new],
                heartbeat=True,
                after_id=self.changes.max_id,
                taken=taken,
                own=self.own,
                seeds=[s.seed for s in new],
                recheck=self.incomplete,
            )
            for s, got in zip(new, stored, strict=True):
                if got is None:
                    why = "another engine already trains the same parameter set or seed"
                    self._lost(s.key, why, collided=True)
                    self.taken_params.add(param_set(s.trial.params, s.trial.distributions))
                else:
                    self._hold(s.key, *got, s.trial.params)
        for s in starts:
            if s.claim is not None:
                if self._claim(s):
                    number = self.storage.get_trial_number_from_id(s.claim)
                    self._hold(s.key, s.claim, number, s.trial.params)
                else:
                    self._lost(s.key, "another engine took it first", collided=False)

    def _lost(self, key: int, why: str, *, collided: bool) -> None:
        self.claims.give_back(1)
        self.results.put(("lost", key, why, collided))

    def _hold(self, key: int, trial_id: int, number: int, params: dict) -> None:
        self.held_ever += 1
        with self.lock:
            self.ids[key] = trial_id
        self.numbers[trial_id] = number
        self.params[trial_id] = params
        self.own.add(trial_id)
        self.results.put(("started", key, number))

    def _claim(self, s: Start) -> bool:
        """Take a WAITING trial as Optuna's ask() does: the state change is the atomic step. A
        trial another engine claimed and finished already, or that another process finishes
        before its attrs are written (chaos.py found both), is lost to this engine, as one
        another engine claimed first."""
        try:  # Optuna raises, rather than returns False, when the trial has finished already
            if not self.storage.set_trial_state_values(s.claim, TrialState.RUNNING):
                return False
            self._label_claimed(s)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        return True

    def _label_claimed(self, s: Start) -> None:
        self.storage.set_trial_system_attr(s.claim, OWNER_ATTR, self.owner)
        if self.journal:
            beat(self.storage, [s.claim], HEARTBEAT_ATTR)
        else:  # its heartbeat row: Optuna's stale check skips trials without one
            self.storage.record_heartbeat(s.claim)
        stored = self.storage.get_trial(s.claim)
        for name, value in s.trial.params.items():
            if name not in stored.params:  # enqueue_trial stores fixed params, not params
                dist = s.trial.distributions[name]
                self.storage.set_trial_param(s.claim, name, dist.to_internal_repr(value), dist)
        for k, v in s.trial.user_attrs.items():
            self.storage.set_trial_user_attr(s.claim, k, v)

    def values(self, values: dict[int, dict[int, float]]) -> None:
        append_values(
            self.storage, {self.ids[k]: v for k, v in values.items() if k in self.ids and v}
        )

    def finish(self, f: Finish) -> None:
        self.finish_all([f])

    def finish_all(self, finishes: list[Finish]) -> None:
        """Trials that ended, in one transaction: a new best's weights first (an artifact needs
        a RUNNING trial), then every state, value and attr, then each TensorBoard run."""
        held = []
        for f in finishes:
            with self.lock:
                trial_id = self.ids.pop(f.key, None)
            if trial_id is None:  # never stored (lost to another engine)
                self.results.put(("dropped", f.key))
            else:
                held.append((f, trial_id, self.numbers.pop(trial_id), self.params.pop(trial_id)))
        if not held:
            return
        self.warm_up.wait()
        endings = []
        # the best first: of the trials that came with weights, those best when stored keep them
        for f, trial_id, number, _ in sorted(held, key=_upload_order):
            attrs = dict(f.attrs)
            if f.model is not None and f.value < self.best:
                try:
                    attrs["model_artifact"] = upload_model(
                        self.store,
                        self.storage.get_trial(trial_id),
                        number,
                        f.tcfg,
                        f.model,
                        self.storage,
                        scaling=self.cfg.data.input_scaling,
                    )
                except optuna.exceptions.UpdateFinishedTrialError:  # failed elsewhere
                    continue
                self.best = f.value
            endings.append(
                Ending(trial_id, f.state, f.value, f.values, attrs, f.system_attrs, f.completed)
            )
        done = finish_trials(self.storage, endings)
        stored = {e.trial_id for e, ok in zip(endings, done, strict=True) if ok}
        for f, trial_id, number, params in held:
            if trial_id not in stored:
                self._not_stored(f, number)
                continue
            logger = TrialLogger(self.cfg.log_dir, self.cfg.study, number)
            for log, walltime in f.epochs:
                logger.log_epoch(log, walltime=walltime)
            logger.close(dict(params), f.metrics, f.state.name)
            value = f.value if f.value is None or abs(f.value) != float("inf") else None
            self.results.put(("written", f.key, number, f.state.name, value))

    def _not_stored(self, f: Finish, number: int) -> None:
        """Another engine failed the trial while it trained: its claim goes back to the budget,
        so the trial counts for nothing and its retry (or a new trial) takes its place."""
        self.held_ever -= 1
        self.claims.give_back(1, for_queued=self.cfg.max_retries > 0)  # as in _stop_failed
        self.results.put(("dropped", f.key))
        print(
            f"sinstudy: trial #{number} had been failed by another engine (no heartbeat for "
            f"{self.cfg.grace_period} s); its result is not stored",
            file=sys.stderr,
        )

    # ---------------------------------------------------------------- between jobs

    def _beat(self) -> None:
        """The heartbeat thread: every trial held, every `heartbeat_interval`, while the loop
        lives. A storage error ends it; the loop reports it."""
        while True:
            time.sleep(self.cfg.heartbeat_interval)
            if time.monotonic() - self.looped > STUCK_S:
                continue
            with self.lock:
                ids = list(self.ids.values())
            try:  # a trial that finishes meanwhile: a beat on a finished trial changes nothing
                beat(self.storage, ids, HEARTBEAT_ATTR)
            except BaseException as e:
                self.beat_error = e
                return

    def periodic(self) -> None:
        now = self.looped = time.monotonic()
        if self.beat_error is not None:
            raise self.beat_error
        if now >= self.due["sync"]:
            self.sync()
            self.due["sync"] = now + SYNC_S
        if now >= self.due["sweep"]:
            swept = sweep_stale(
                self.study, grace_period=self.cfg.grace_period, max_retries=self.cfg.max_retries
            )
            for n, why in swept.items():
                retry = " and queued for retry" if self.cfg.max_retries else ""
                print(f"sinstudy: trial #{n}: {why}; marked FAIL{retry}", file=sys.stderr)
            self.due["sweep"] = now + max(self.cfg.heartbeat_interval, self.cfg.grace_period / 2)

    def sync(self) -> None:
        """Send the trainer the trials others stored or changed since the last look, and the
        trials it trains that were failed from outside."""
        with self.lock:
            held = dict(self.ids)
        changed = self.changes.read(self.storage, self.study_id, self.own)
        if self.journal:  # replayed in memory: the states are there already
            ids = set(held.values())
            states = {
                t._trial_id: t.state
                for t in self.storage.get_all_trials(self.study_id, deepcopy=False)
                if t._trial_id in ids
            }
        else:
            states = trial_states(self.storage, held.values())
        self._stop_failed(held, states)
        for t in changed:
            if isinstance(t.user_attrs.get("seed"), int):
                self.seeds.add(t.user_attrs["seed"])
            if t.state == TrialState.RUNNING and not (t.params and "seed" in t.user_attrs):
                self.incomplete.add(t._trial_id)
            else:
                self.incomplete.discard(t._trial_id)
            # a trial comes again when it ends: its params were taken when it came running
            if t.params and t.state != TrialState.FAIL and t._trial_id not in self.params_seen:
                self.taken_params.add(param_set(t.params, t.distributions))
                self.params_seen.add(t._trial_id)
            if t.state == TrialState.COMPLETE and t.value is not None:
                self.best = min(self.best, t.value)
        if changed:
            self.results.put(("sync", changed))

    def _stop_failed(self, held: dict[int, int], states: dict[int, TrialState]) -> None:
        """Trials of ours that someone else finished (a sweep that took our trial for dead,
        optuna-dashboard's "Fail trial"): they count for nothing, their claims go back, and the
        trainer stops them."""
        for key, trial_id in held.items():
            if not states.get(trial_id, TrialState.RUNNING).is_finished():
                continue
            with self.lock:
                if self.ids.get(key) != trial_id:
                    continue
                del self.ids[key]
            number = self.numbers.pop(trial_id)
            self.params.pop(trial_id, None)
            self.held_ever -= 1
            # a sweep queues its retry, which this run then takes (a claim kept for it)
            self.claims.give_back(1, for_queued=self.cfg.max_retries > 0)
            self.results.put(("failed", key, number))
            print(
                f"sinstudy: trial #{number} was marked {states[trial_id].name} by another process "
                f"while it trained (a sweep that found no heartbeat, or optuna-dashboard); "
                f"stopped, and its slot goes to the next trial",
                file=sys.stderr,
            )

    def fail_held(self) -> None:
        """The trainer died: fail the trials it was training and queue their retries, and give
        back their budget (the retries run in their places) and that of trials never handed
        over."""
        failed = [
            n for n in self.numbers.values() if fail_and_retry(self.study, n, self.cfg.max_retries)
        ]
        self.claims.give_back(self.claims.claims.value - self.held_ever)
        self.claims.give_back(len(failed), for_queued=self.cfg.max_retries > 0)
        if failed:
            print(
                f"sinstudy: the training process died; trials "
                f"{', '.join(f'#{n}' for n in sorted(failed))} "
                f"marked FAIL{' and queued for retry' if self.cfg.max_retries else ''}",
                file=sys.stderr,
            )

    def publish(self) -> None:
        self.warm_up.wait()
        publish(self.study)
