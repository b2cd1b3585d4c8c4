"""Crash recovery: a dead worker's trial is marked FAIL and its params are retried (bounded).

Three ways a trial's worker can vanish, and who notices:
  - a worker process of `sinstudy run --workers N` dies (SIGKILL, OOM): the parent sees it at
    once and calls `fail_and_retry` on the trial that worker was running;
  - a whole run dies (machine lost, parent killed) on an RDB storage (SQLite, PostgreSQL):
    Optuna's heartbeat. Each running trial beats every `heartbeat_interval` s; any later worker
    fails trials silent for `grace_period` s and the stale-trial callback enqueues a retry;
  - the same on a journal file, which has no heartbeat in Optuna: `JournalHeartbeat` writes a
    system attr every interval and `sweep_stale` plays the stale-trial check. The batched engine
    beats and sweeps from its writer process (study.batched.writer).
Retries use Optuna's RetryHeartbeatStaleTrialCallback, so a retried trial carries
`failed_trial` / `retry_history` system attrs exactly as Optuna's own heartbeat writes them.
"""

from __future__ import annotations

import threading
import time

import optuna
from optuna.storages import JournalStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from .quiet import experimental

HEARTBEAT_ATTR = "sinstudy:heartbeat"  # unix time of a journal trial's last beat


class StaleRetry:
    """Optuna's stale-trial callback (RetryHeartbeatStaleTrialCallback), which also remembers the
    trials it was called for: Optuna calls it only for the trials this process failed, so a
    sweep can name them (and not those another engine failed at the same moment)."""

    def __init__(self, max_retries: int):
        with experimental():  # experimental in Optuna 5.0; its behaviour is what we want
            self._retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retries)
        self.failed: list[int] = []

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._retry(study, trial)
        self.failed.append(trial.number)


def fail_and_retry(study: optuna.Study, trial_number: int, max_retries: int) -> bool:
    """Mark a RUNNING trial FAIL and enqueue its params once more (up to max_retries times).

    Returns False when the trial was no longer RUNNING (it finished, or another process failed
    it first): then nothing is changed.
    """
    trial = _by_number(study, trial_number)
    if trial is None or trial.state != TrialState.RUNNING:
        return False
    try:
        if not study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    if max_retries > 0:
        StaleRetry(max_retries)(study, study._storage.get_trial(trial._trial_id))
    return True


def _by_number(study: optuna.Study, number: int) -> FrozenTrial | None:
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.number == number:
            return t
    return None


def sweep_stale(study: optuna.Study, *, grace_period: float, max_retries: int) -> list[int]:
    """Fail (and retry) trials whose worker is gone. RDB: Optuna's heartbeat; journal: ours."""
    storage = study._storage
    if not isinstance(storage, JournalStorage):
        callback = storage.get_heartbeat_stale_trial_callback()
        if not isinstance(callback, StaleRetry):  # a storage opened without our heartbeat
            return []
        seen = len(callback.failed)
        with experimental():  # "experimental" since Optuna 2.9; what the heartbeat runs
            optuna.storages.fail_stale_trials(study)
        return sorted(callback.failed[seen:])
    now = time.time()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = t.system_attrs.get(HEARTBEAT_ATTR)
        if beat is None and t.datetime_start is not None:
            beat = t.datetime_start.timestamp()
        if (
            beat is not None
            and now - beat > grace_period
            and fail_and_retry(study, t.number, max_retries)
        ):
            failed.append(t.number)
    return failed


class JournalHeartbeat:
    """Beat a journal trial every `interval` seconds from a daemon thread while it runs."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial, interval: float):
        self._storage = study._storage
        self._trial_id = trial._trial_id
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="sinstudy-heartbeat")

    def _beat(self) -> None:
        while True:
            try:
                self._storage.set_trial_system_attr(self._trial_id, HEARTBEAT_ATTR, time.time())
            except optuna.exceptions.UpdateFinishedTrialError:
                return
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> JournalHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
