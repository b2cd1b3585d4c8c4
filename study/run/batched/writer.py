"""The batched engine's storage I/O, in a process of its own: the trainer never waits on storage.

What the writer does with the trainer's jobs (study.run.batched.messages), in order:
  - `Starts`: a trial the engine has just asked is created RUNNING in storage (params,
    distributions, the sampler's system attrs, `engine`/`seed`/`worker` user attrs, a heartbeat),
    all of one fill in one transaction, numbered in start order. A WAITING trial the engine
    took from Optuna's queue (enqueue_trial, retries) is taken atomically, as Optuna's ask()
    takes it; if another engine was first, or another engine already trains the same parameter
    set, the trainer is told (`Lost`) and drops the slot;
  - `Curves`: intermediate values, flushed by the trainer about once a second, in one transaction;
  - `Finish`: a new best's weights and fit image are uploaded as artifacts (the trial is still
    RUNNING: Optuna takes none on finished trials), then its state, value, remaining values
    and attrs in one transaction, then its TensorBoard run with each epoch's original time.
Storing is `_Sink`'s; keeping the trials alive is its `_Keeper`'s. Between jobs: the trials
other engines stored (sent to the trainer's mirror, `SYNC_S`), and the stale-trial sweep that
fails and retries trials of dead runs (`grace_period`). The heartbeat of
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

import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from collections import deque

import optuna
from optuna.trial import TrialState

from study.config import StudyConfig
from study.errors import StorageError
from study.run.batched.messages import (
    Close,
    Closed,
    Curves,
    Dropped,
    Failed,
    Finish,
    Job,
    Known,
    Lost,
    Reply,
    Start,
    Started,
    Starts,
    Synced,
    WriterFailed,
    Written,
)
from study.run.batched.sync import SYNC_S, Changes
from study.run.budget import Claims
from study.run.ledger import give_back
from study.store import Store
from study.store.base import Ending, Take, Taken
from study.store.recovery import (
    OWNER_ATTR,
    fail_and_retry,
    owner_attr,
    retry_chain,
    sweep_stale,
)
from study.trial.space import param_set
from study.views.artifacts import ArtifactFolder, store_model
from study.views.dashboard import publish
from study.views.tracking import TrialLogger

_SIGNALS = {signal.SIGINT, signal.SIGTERM}
# Ended trials stored in one transaction at most: a GPU engine ends hundreds at one epoch (the
# first rung of Hyperband), one transaction each kept the writer behind.
FINISH_BATCH = 256
# A writer whose loop has not come round for this long stops beating: its trials go stale and
# other engines recover them, as they would a dead writer's.
STUCK_S = 60.0


class WriterError(RuntimeError):
    """The writer process failed; its message is one line (the CLI prints it as it is)."""

    exit_code = 1


class Writer:
    """The trainer's side: put(), poll() what came back, close() at the end."""

    def __init__(
        self, cfg: StudyConfig, store: Store, known: Known, budget=None, *, worker: int = 0
    ):
        ctx = mp.get_context("spawn")  # no fork: the trainer has torch's thread pools running
        self.jobs, self.results = ctx.Queue(), ctx.Queue()
        # The trainer's budget claims: the writer gives back those of trials it could not
        # store, and, if the trainer dies, those it never received.
        self.claims = Claims(budget, worker)
        # Set when the run is interrupted: a writer waiting out an outage stops waiting.
        self.stop = ctx.Event()
        self.proc = ctx.Process(
            target=_main,
            args=(
                cfg,
                store,
                known,
                self.jobs,
                self.results,
                os.getpid(),
                self.claims,
                self.stop,
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
        self.claims.add()

    def put(self, job: Job) -> None:
        self.jobs.put(job)

    def poll(self) -> list[Reply]:
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

    def close(self, *, publish: bool, interrupted: bool = False) -> list[Reply]:
        """Wait until every job put so far is done (and the note written if `publish`).
        The close message goes first: if this wait is interrupted (a second Ctrl-C), the writer
        still drains and exits by itself, and the interpreter's exit waits for it.
        `interrupted`: a writer waiting out an outage gives up (what waits is not stored)."""
        if self._closed:
            return []
        self._closed = True
        if interrupted:
            self.stop.set()
        self.jobs.put(Close(publish))
        out = []
        while True:
            try:
                msg = self.results.get(timeout=1.0)
            except queue.Empty:
                if not self.proc.is_alive():
                    self._died()
                continue
            if isinstance(msg, Closed):
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
    def _check(msg: Reply) -> Reply:
        if isinstance(msg, WriterFailed):
            raise WriterError(msg.message)
        return msg


# ------------------------------------------------------------------------ the writer process


def _main(
    cfg: StudyConfig,
    store: Store,
    known: Known,
    jobs: mp.Queue,
    results: mp.Queue,
    parent: int,
    claims: Claims,
    stop,
) -> None:
    for s in _SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    store.outage.give_up = stop.is_set
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    import torch

    # the trainer has the cores; this process draws one small image at most
    torch.set_num_threads(1)
    sink: _Sink | None = None  # None once it has failed: later jobs are drained, not written
    try:
        sink = _Sink(cfg, store, known, results, claims)
    except BaseException as e:
        results.put(WriterFailed(_one_line(e, store)))
    # This process never puts jobs: closing its copy of the pipe's sending end means a trainer
    # killed in the middle of a put leaves an EOF here, not a read that waits forever.
    jobs._writer.close()
    inbox = _Inbox(jobs, parent)
    while (item := inbox.next()) is not _DONE:
        if item is _AGAIN:
            continue
        if item is None and sink is not None:  # the first idle moment
            sink.warm_up.start()
        if sink is not None:
            sink = _handle(sink, results, inbox, item)
        if sink is not None and not inbox.close:
            sink = _guarded(sink, results, sink.periodic)
    _wind_down(sink, results, inbox)


_DONE = object()  # the inbox is closed and empty
_AGAIN = object()  # the trainer is gone: read on (what is queued), then end


class _Inbox:
    """The trainer's jobs as the writer's loop reads them. After `Close` (or once the trainer
    is gone: a pipe at EOF, a parent that changed) it drains what is queued and ends."""

    def __init__(self, jobs: mp.Queue, parent: int):
        self.jobs, self.parent = jobs, parent
        self.ahead: deque[Job] = deque()  # a job read while gathering finishes, handled next
        self.close: Close | None = None
        self.orphaned = False  # the trainer died: its trials are failed and retried

    def next(self) -> Job | None | object:
        """The next job; None after an idle moment; _AGAIN when the trainer turns out gone;
        _DONE at the end."""
        try:
            if self.ahead:
                item = self.ahead.popleft()
            else:
                item = self.jobs.get_nowait() if self.close else self.jobs.get(timeout=0.2)
        except (EOFError, OSError):  # the trainer died mid-put: nothing more will come
            return _DONE if self.close else self._orphan()
        except queue.Empty:
            if self.close:
                return _DONE
            if os.getppid() != self.parent:  # the trainer died: store what is queued, then go
                return self._orphan()
            return None
        if isinstance(item, Close):
            self.close = item
        return item

    def _orphan(self) -> object:
        self.close, self.orphaned = Close(publish=False), True
        return _AGAIN

    def finishes(self, first: Finish) -> list[Finish]:
        """`first` with the finishes queued behind it: one transaction."""
        batch = [first]
        while len(batch) < FINISH_BATCH:
            try:
                nxt = self.ahead.popleft() if self.ahead else self.jobs.get_nowait()
            except (queue.Empty, EOFError, OSError):  # EOF: the next get sees it again
                break
            if not isinstance(nxt, Finish):
                self.ahead.append(nxt)
                break
            batch.append(nxt)
        return batch


def _handle(sink: _Sink, results: mp.Queue, inbox: _Inbox, item: Job | None) -> _Sink | None:
    match item:
        case Finish():
            return _guarded(sink, results, sink.finish_all, inbox.finishes(item))
        case Starts(starts):
            return _guarded(sink, results, sink.start, starts)
        case Curves(values):
            return _guarded(sink, results, sink.values, values)
    return sink


def _wind_down(sink: _Sink | None, results: mp.Queue, inbox: _Inbox) -> None:
    """Fail the trials of a dead trainer, write the note, say Closed, and exit."""
    if sink is not None and inbox.orphaned:
        sink = _guarded(sink, results, sink.fail_held)
    if sink is not None and inbox.close.publish:
        _guarded(sink, results, sink.publish)
    if inbox.orphaned:  # nobody reads the results any more: a full pipe must not keep this process
        results.cancel_join_thread()
    else:
        results.put(Closed())
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
        if os.environ.get("SINSTUDY_DEBUG"):  # as the CLI: the traceback, for a developer
            import traceback

            traceback.print_exc()
        results.put(WriterFailed(_one_line(e, sink.db)))
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
            import tensorboard.compat.proto.event_pb2  # noqa: F401
            import tensorboard.plugins.hparams.api_pb2  # noqa: F401
            import tensorboard.summary.writer.record_writer  # noqa: F401
            import torch.utils.tensorboard.summary  # noqa: F401

            from study.views import plots  # noqa: F401  (plotly)
        except Exception:  # the job that needs them imports them again and reports the failure
            pass


def _one_line(e: BaseException, store: Store) -> str:
    """The writer's failure for the user: the storage's fault where it is one (a full disk, a
    lost database; an outage waited out past its bound), else the error's first line."""
    if isinstance(e, StorageError):
        return f"storage writer: {e}"
    fault = store.fault(e)
    if fault is not None:
        return f"storage writer: {fault}"
    text = str(e).strip().splitlines()
    return f"storage writer: {type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


class _Held:
    """The trials a writer holds for its trainer, from their start to their end. Its heartbeat
    thread reads their ids; everything else is the writer loop's."""

    def __init__(self):
        self.lock = threading.Lock()  # `ids`, shared with the heartbeat thread
        self.ids: dict[int, int] = {}  # handle -> trial_id
        self.numbers: dict[int, int] = {}  # trial_id -> number
        self.params: dict[int, dict] = {}  # trial_id -> params
        self.own: set[int] = set()  # every trial id this writer started
        self.ever = 0  # trials stored for the trainer: each used one of its budget claims

    def hold(self, handle: int, trial_id: int, number: int, params: dict) -> None:
        self.ever += 1
        with self.lock:
            self.ids[handle] = trial_id
        self.numbers[trial_id] = number
        self.params[trial_id] = params
        self.own.add(trial_id)

    def release(self, handle: int, trial_id: int | None = None) -> tuple[int, int, dict] | None:
        """Hold `handle` no longer (only if it is still `trial_id`, when that is given): its
        (trial_id, number, params), or None when it was not held."""
        with self.lock:
            held = self.ids.get(handle)
            if held is None or trial_id not in (None, held):
                return None
            del self.ids[handle]
        return held, self.numbers.pop(held), self.params.pop(held)

    def snapshot(self) -> dict[int, int]:
        with self.lock:
            return dict(self.ids)


class _Seen:
    """What the writer knows of the other engines' trials: what a start must not repeat, and
    the best stored value (a new best's weights are uploaded)."""

    def __init__(self, known: Known):
        self.changes = Changes(known.max_id, known.unfinished)  # what the mirror has seen
        # parameter sets of every trial of others this writer has seen (FAIL ones excepted)
        self.taken_params = set(known.params)
        self.params_seen: set[int] = set()  # others' trials whose params are in taken_params
        self.best = known.best
        self.seeds = set(known.seeds)  # weight seeds of every trial this writer has seen
        # others' running trials seen without their params or seed yet (the standard engine
        # stores them after creating the trial): the storage checks them again at each start
        self.incomplete = set(known.incomplete)

    def learn(self, changed: list) -> None:
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
            if t.state == TrialState.COMPLETE and t.values:
                self.best = min(self.best, t.values[0])


class _Sink:
    """The writer process's storing: the trainer's jobs into storage, the artifact store and
    the TensorBoard folder. Keeping its trials alive is its `keeper`'s."""

    def __init__(
        self, cfg: StudyConfig, store: Store, known: Known, results: mp.Queue, claims: Claims
    ):
        self.cfg, self.results, self.claims = cfg, results, claims
        self.db = store
        self.storage = self.db.optuna
        try:
            self.study_id = self.storage.get_study_id_from_name(cfg.study)
        except KeyError:  # Optuna says only "Record does not exist."
            raise LookupError(
                f"study {cfg.study!r} is not in {cfg.storage} (deleted while the run started?)"
            ) from None
        self.study = optuna.load_study(study_name=cfg.study, storage=self.storage)
        self.store = ArtifactFolder(cfg.artifact_dir)
        self.held = _Held()
        self.seen = _Seen(known)
        self.owner = owner_attr()
        self.warm_up = _WarmUp()
        self.keeper = _Keeper(self)

    def periodic(self) -> None:
        self.keeper.periodic()

    # ---------------------------------------------------------------- jobs

    def start(self, starts: list[Start]) -> None:
        for s in starts:
            s.trial.system_attrs[OWNER_ATTR] = self.owner
            s.trial.system_attrs.update(self.db.heartbeat_attrs())
        new = [s for s in starts if s.queued is None]
        seen = self.seen
        if new:
            # Every parameter set and seed of others seen (the storage checks what it holds
            # after the last sync, under its lock): a new trial repeats none. A sampler can
            # propose a point it knows (two runs on one study whose samplers were seeded
            # alike drew the same first point), so what the mirror holds counts too.
            taken = Taken(frozenset(seen.taken_params), frozenset(seen.seeds))
            stored = self.db.add_trials(
                self.study_id,
                [s.trial for s in new],
                heartbeat=True,
                after_id=seen.changes.max_id,
                taken=taken,
                own=self.held.own,
                seeds=[
                    None if s.seed is None else range(s.seed, s.seed + self.cfg.repeats)
                    for s in new
                ],
                recheck=seen.incomplete,
            )
            for s, got in zip(new, stored, strict=True):
                if got is None:
                    why = "another engine already trains the same parameter set or seed"
                    self._lost(s.handle, why, collided=True)
                    seen.taken_params.add(param_set(s.trial.params, s.trial.distributions))
                else:
                    self._hold(s.handle, *got, s.trial.params)
        for s in starts:
            if s.queued is None:
                continue
            took = self._take_queued(s)
            if took is Take.TAKEN:
                number = self.storage.get_trial_number_from_id(s.queued)
                self._hold(s.handle, s.queued, number, s.trial.params)
            elif took is Take.SEED:  # still WAITING: the trainer asks it again, other seeds
                self._give_back("seed_held")
                self.results.put(Lost(s.handle, "another trial holds its seed", True, True))
            else:
                self._lost(s.handle, "another engine took it first", collided=False)

    def _give_back(self, event: str, n: int = 1) -> None:
        """The claims of `n` trials after edge `event` of their life (study.run.ledger)."""
        give_back(self.claims, event, n, retries=self.cfg.max_retries)

    def _lost(self, handle: int, why: str, *, collided: bool) -> None:
        self._give_back("lost")
        self.results.put(Lost(handle, why, collided))

    def _hold(self, handle: int, trial_id: int, number: int, params: dict) -> None:
        self.held.hold(handle, trial_id, number, params)
        self.results.put(Started(handle, number))

    def _take_queued(self, s: Start) -> Take:
        """Take a WAITING trial as Optuna's ask() does, its seeds checked (Store.take_queued). A
        trial another engine took and finished already, or that another process finishes
        before its attrs are written, is lost to this engine, as one another engine took
        first."""
        chain = retry_chain(s.trial.system_attrs)
        seeds = None if s.seed is None else range(s.seed, s.seed + self.cfg.repeats)
        try:
            took = self.db.take_queued(self.study_id, s.queued, seeds, chain=chain)
            if took is Take.TAKEN:
                self._label_taken(s)
        except optuna.exceptions.UpdateFinishedTrialError:
            return Take.GONE
        return took

    def _label_taken(self, s: Start) -> None:
        self.storage.set_trial_system_attr(s.queued, OWNER_ATTR, self.owner)
        self.db.start_beat(s.queued)
        stored = self.storage.get_trial(s.queued)
        for name, value in s.trial.params.items():
            if name not in stored.params:  # enqueue_trial stores fixed params, not params
                dist = s.trial.distributions[name]
                self.storage.set_trial_param(s.queued, name, dist.to_internal_repr(value), dist)
        for k, v in s.trial.user_attrs.items():
            self.storage.set_trial_user_attr(s.queued, k, v)

    def values(self, values: dict[int, dict[int, float]]) -> None:
        ids = self.held.snapshot()
        self.db.append_values({ids[h]: v for h, v in values.items() if h in ids and v})

    def finish_all(self, finishes: list[Finish]) -> None:
        """Trials that ended, in one transaction: a new best's weights first (an artifact needs
        a RUNNING trial), then every state, value and attr, then each TensorBoard run."""
        held = []
        for f in finishes:
            got = self.held.release(f.handle)
            if got is None:  # never stored (lost to another engine)
                self.results.put(Dropped(f.handle))
            else:
                held.append((f, *got))
        if not held:
            return
        self.warm_up.wait()
        endings = []
        # the best first: of the trials that came with weights, those best when stored keep them
        for f, trial_id, number, _ in sorted(held, key=_upload_order):
            attrs = dict(f.attrs)
            if f.model is not None and f.value < self.seen.best:
                try:
                    kept = store_model(
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
                attrs |= kept
                self.seen.best = f.value
            endings.append(
                Ending(
                    trial_id,
                    f.state,
                    f.value,
                    f.values,
                    attrs,
                    f.system_attrs,
                    f.completed,
                    f.rest,
                )
            )
        done = self.db.finish_trials(endings)
        stored = {e.trial_id for e, ok in zip(endings, done, strict=True) if ok}
        for f, trial_id, number, params in held:
            if trial_id not in stored:
                self._not_stored(f, trial_id, number)
                continue
            logger = TrialLogger(self.cfg.log_dir, self.cfg.study, number)
            for log, walltime in f.epochs:
                logger.log_epoch(log, walltime=walltime)
            logger.close(dict(params), f.metrics, f.state.name)
            value = f.value if f.value is None or abs(f.value) != float("inf") else None
            self.results.put(Written(f.handle, number, f.state, value))

    def _not_stored(self, f: Finish, trial_id: int, number: int) -> None:
        """Another process finished the trial while it trained, and the trial ended before the
        keeper's sync saw it (`_Keeper._stop_failed` otherwise): its claim goes back to the
        budget, so the trial counts for nothing and its retry (or a new trial) takes its place."""
        self.held.ever -= 1
        self._give_back("dropped")
        self.results.put(Dropped(f.handle))
        state = self.storage.get_trial(trial_id).state.name
        print(
            f"sinstudy: trial #{number} was marked {state} by another process while it trained "
            f"(a sweep that found no heartbeat, or optuna-dashboard); its result is not stored",
            file=sys.stderr,
        )

    def fail_held(self) -> None:
        """The trainer died: fail the trials it was training and queue their retries, and give
        back their budget (the retries run in their places) and that of trials never handed
        over."""
        failed = [
            n
            for n in self.held.numbers.values()
            if fail_and_retry(self.db, self.study, n, self.cfg.max_retries)
        ]
        self._give_back("unconfirmed", self.claims.count() - self.held.ever)
        self._give_back("orphaned", len(failed))
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


class _Keeper:
    """Keeping a writer's trials alive and its trainer in step with the study: each held trial's
    heartbeat (a thread of its own), the other engines' trials sent to the mirror (`SYNC_S`),
    held trials failed from outside stopped, and the stale-trial sweep (`grace_period`)."""

    def __init__(self, sink: _Sink):
        self.sink, self.cfg, self.held = sink, sink.cfg, sink.held
        now = time.monotonic()
        # the first sweep soon: a replaced worker's trials are recovered by the next one here
        self.due = {"sync": now + SYNC_S, "sweep": now + min(SYNC_S, self.cfg.grace_period)}
        self.looped = now  # when the loop last came round (the heartbeat's proof of life)
        self.beat_error: BaseException | None = None
        threading.Thread(target=self._beat, name="heartbeat", daemon=True).start()

    def _beat(self) -> None:
        """Every trial held, every `heartbeat_interval`, while the loop lives. A storage error
        ends it; the loop reports it."""
        while True:
            time.sleep(self.cfg.heartbeat_interval)
            if time.monotonic() - self.looped > STUCK_S:
                continue
            ids = list(self.held.snapshot().values())
            try:  # a trial that finishes meanwhile: a beat on a finished trial changes nothing
                self.sink.db.beat(ids)
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
                self.sink.db,
                self.sink.study,
                grace_period=self.cfg.grace_period,
                max_retries=self.cfg.max_retries,
            )
            for n, why in swept.items():
                retry = " and queued for retry" if self.cfg.max_retries else ""
                print(f"sinstudy: trial #{n}: {why}; marked FAIL{retry}", file=sys.stderr)
            self.due["sweep"] = now + max(self.cfg.heartbeat_interval, self.cfg.grace_period / 2)

    def sync(self) -> None:
        """Send the trainer the trials others stored or changed since the last look, and stop
        the trials it trains that were failed from outside."""
        sink, held = self.sink, self.held.snapshot()
        changed = sink.seen.changes.read(sink.db, sink.study_id, self.held.own)
        states = sink.db.trial_states(sink.study_id, held.values())
        self._stop_failed(held, states)
        sink.seen.learn(changed)
        # sent when nothing changed too: the trainer counts syncs (a wait for a retry)
        sink.results.put(Synced(changed))

    def _stop_failed(self, held: dict[int, int], states: dict[int, TrialState]) -> None:
        """Trials of ours that someone else finished (a sweep that took our trial for dead,
        optuna-dashboard's "Fail trial"): they count for nothing, their claims go back, and the
        trainer stops them."""
        for handle, trial_id in held.items():
            if not states.get(trial_id, TrialState.RUNNING).is_finished():
                continue
            got = self.held.release(handle, trial_id)
            if got is None:
                continue
            number = got[1]
            self.held.ever -= 1
            # a sweep queues its retry, which this run then takes (a claim kept for it)
            self.sink._give_back("failed")
            self.sink.results.put(Failed(handle, number))
            print(
                f"sinstudy: trial #{number} was marked {states[trial_id].name} by another process "
                f"while it trained (a sweep that found no heartbeat, or optuna-dashboard); "
                f"stopped, and its slot goes to the next trial",
                file=sys.stderr,
            )
