"""Finished trials of the batched engine go to storage from a process of their own.

Why a process and not a thread: every torch op releases the GIL and takes it back when its
kernel is done. While a writer *thread* ran Python (SQLAlchemy, TensorBoard, matplotlib), each
take-back waited up to the interpreter's switch interval (5 ms) for a kernel of ~20 us. Measured
on the 2-core CPU (bench budget, 128 trials): the training loop took 7.8 s with the writes held
back to the end and 16 s with the writer thread beside it; epochs of 2-3 slots took 100-480 ms
instead of ~3 ms. In a process of its own the writer costs the trainer nothing but a pickle.

What the writer does with a trial, in order: one storage transaction with its params, state,
value, every epoch's intermediate value and its user attrs (study.bulk: one INSERT per table
on an RDB storage, Optuna's create_new_trial on the journal); for a new best, the trial is created RUNNING
first, its weights and fit image are uploaded as artifacts (finished trials take none) and then
it is finished; then its TensorBoard run, written under the trial's number with each epoch's
original wall time. It reports (number, state, value) back for the progress bar. At the end of
a run that was not interrupted it writes the study note the dashboard shows.

The writer ignores SIGINT/SIGTERM (a Ctrl-C reaches the whole process group): the trainer
decides what an interrupt means and the writer drains its queue. If the trainer dies, the writer
writes what is already queued and exits, so a crash loses only trials not yet handed over; a
trial is stored whole or not at all.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue
import signal
from dataclasses import dataclass, field
from datetime import datetime

import torch
from optuna.trial import TrialState

from .config import StudyConfig, TrainConfig
from .train import EpochLog

_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@dataclass
class Record:
    """One finished trial as the engine hands it over (picklable; no storage handles)."""

    params: dict
    distributions: dict
    values: dict[int, float]  # epoch -> validation MSE (Optuna's intermediate values)
    attrs: dict
    state: TrialState
    value: float | None
    started: datetime
    completed: datetime
    epochs: list[tuple[EpochLog, float]] = field(default_factory=list)  # with wall-clock time
    metrics: dict[str, float] = field(default_factory=dict)  # TensorBoard HParams metrics
    model: torch.nn.Module | None = None  # a new best's network (on the CPU), stored as an artifact
    tcfg: TrainConfig | None = None


@dataclass(frozen=True)
class Written:
    number: int
    state: TrialState
    value: float | None


class WriterError(RuntimeError):
    """The writer process failed; its message is one line (the CLI prints it)."""


class Writer:
    """The trainer's side: put() records, poll() what has been written, close() at the end."""

    def __init__(self, cfg: StudyConfig):
        ctx = mp.get_context("spawn")  # no fork: the trainer has torch's thread pools running
        self.jobs, self.results = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_main, args=(cfg, self.jobs, self.results, os.getpid()), name="sinstudy-writer")
        # Signals blocked across the start: the child inherits the mask, ignores both signals
        # first thing, then unblocks, so a Ctrl-C during its start-up cannot kill it.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            self.proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self._closed = False

    def put(self, record: Record) -> None:
        self.jobs.put(record)

    def poll(self) -> list[Written]:
        """What has been written since the last poll (never waits). Raises WriterError."""
        out = []
        while True:
            try:
                msg = self.results.get_nowait()
            except queue.Empty:
                break
            out += self._handle(msg)
        if not out and not self.proc.is_alive():
            raise WriterError(f"the storage writer process died (exit code {self.proc.exitcode}); trials since the last write are lost")
        return out

    def close(self, *, publish: bool) -> list[Written]:
        """Wait until every record put so far is stored (and the note written if `publish`).
        The close message goes first: if this wait is interrupted (a second Ctrl-C), the writer
        still drains and exits by itself, and the interpreter's exit waits for it."""
        if self._closed:
            return []
        self._closed = True
        self.jobs.put(("close", publish))
        out: list[Written] = []
        while True:
            try:
                msg = self.results.get(timeout=1.0)
            except queue.Empty:
                if not self.proc.is_alive():
                    raise WriterError(f"the storage writer process died (exit code {self.proc.exitcode}) before storing every trial") from None
                continue
            if msg[0] == "closed":
                break
            out += self._handle(msg)
        self.proc.join()
        return out

    @staticmethod
    def _handle(msg: tuple) -> list[Written]:
        if msg[0] == "written":
            return [Written(msg[1], TrialState[msg[2]], msg[3])]
        if msg[0] == "error":
            raise WriterError(msg[1])
        return []


# ------------------------------------------------------------------------ the writer process

def _main(cfg: StudyConfig, jobs: mp.Queue, results: mp.Queue, parent: int) -> None:
    for s in _SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    torch.set_num_threads(1)  # the trainer has the cores; this process draws one small image at most
    sink: _Sink | None = None  # None once it has failed: later records are drained, not written
    try:
        sink = _Sink(cfg)
        # Paid now, while the first trials train, instead of at the first new best / the note:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401  (~0.4 s)
        import optuna_dashboard  # noqa: F401  (~1 s)
    except BaseException as e:
        results.put(("error", _one_line(e)))
        sink = None
    close = None  # ("close", publish) once told to stop: then write what is queued and go
    while True:
        try:
            item = jobs.get_nowait() if close else jobs.get(timeout=1.0)
        except queue.Empty:
            if close:
                break
            if os.getppid() != parent:  # the trainer died: store what is queued, then go
                close = ("close", False)
            continue
        if isinstance(item, tuple):
            close = item
        elif sink is not None:
            try:
                results.put(("written", *sink.write(item)))
            except BaseException as e:
                results.put(("error", _one_line(e)))
                sink = None
    if sink is not None and close[1]:
        try:
            sink.publish()
        except BaseException as e:
            results.put(("error", f"the study note was not written: {_one_line(e)}"))
    results.put(("closed",))
    results.close()
    results.join_thread()  # the message is in the pipe
    # Everything is committed and closed; skip the interpreter's teardown of torch,
    # SQLAlchemy and matplotlib (~0.8 s), which the trainer would otherwise wait for.
    os._exit(0)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"storage writer: {type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


class _Sink:
    """The writer process's storage, artifact store and TensorBoard folder."""

    def __init__(self, cfg: StudyConfig):
        from optuna.artifacts import FileSystemArtifactStore

        from . import storage as storage_mod

        self.cfg = cfg
        self.storage = storage_mod.open_storage(storage_mod.parse(cfg.storage))
        try:
            self.study_id = self.storage.get_study_id_from_name(cfg.study)
        except KeyError:  # Optuna says only "Record does not exist."
            raise LookupError(f"study {cfg.study!r} is not in {cfg.storage} (deleted while the run started?)") from None
        self.store = FileSystemArtifactStore(cfg.artifact_dir)

    def write(self, r: Record) -> tuple[int, str, float | None]:
        from optuna.trial import FrozenTrial

        from .bulk import add_trial
        from .objective import upload_model
        from .tracking import TrialLogger

        with_artifacts = r.model is not None
        template = FrozenTrial(
            number=0, state=TrialState.RUNNING if with_artifacts else r.state,
            value=None if with_artifacts or r.state == TrialState.FAIL else r.value,
            datetime_start=r.started, datetime_complete=None if with_artifacts else r.completed,
            params=r.params, distributions=r.distributions, user_attrs=r.attrs, system_attrs={},
            intermediate_values=r.values, trial_id=0,
        )
        trial_id, number = add_trial(self.storage, self.study_id, template)
        if with_artifacts:
            artifact = upload_model(self.store, self.storage.get_trial(trial_id), number, r.model, r.tcfg, self.storage)
            self.storage.set_trial_user_attr(trial_id, "model_artifact", artifact)
            self.storage.set_trial_state_values(trial_id, r.state, None if r.value is None else [r.value])
        logger = TrialLogger(self.cfg.log_dir, self.cfg.study, number)
        for log, walltime in r.epochs:
            logger.log_epoch(log, walltime=walltime)
        logger.close(dict(r.params), r.metrics)
        value = r.value if r.value is None or math.isfinite(r.value) else None
        return number, r.state.name, value

    def publish(self) -> None:
        import optuna

        from .dashboard import publish

        publish(optuna.load_study(study_name=self.cfg.study, storage=self.storage))
