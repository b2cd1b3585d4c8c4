"""Crash recovery: a dead worker's trial is marked FAIL and its params are retried (bounded).

Three ways a trial's worker can vanish, and who notices:
  - a worker process of `sinstudy run --workers N` dies (SIGKILL, OOM): the parent sees it at
    once and calls `fail_and_retry` on the trial that worker was running;
  - a whole run dies (machine lost, parent killed) on an RDB storage (SQLite, PostgreSQL):
    Optuna's heartbeat. Each running trial beats every `heartbeat_interval` s; any later worker
    fails trials silent for `grace_period` s and the stale-trial callback enqueues a retry;
  - the same on a journal file, which has no heartbeat in Optuna: the store beats a system attr
    every interval and `sweep_stale` plays the stale-trial check (`Store.silent`). The batched
    engine beats and sweeps from its writer process (study.run.batched.writer).
A trial whose owner ran on this machine (OWNER_ATTR: host, boot, pid and the process's start
time) is failed and retried by the next sweep here as soon as that process is gone, without
waiting for the grace period: a restart on the same machine finds its predecessor's trials at
once. Trials of other machines keep the heartbeat rule.
Retries use Optuna's RetryHeartbeatStaleTrialCallback, so a retried trial carries
`failed_trial` / `retry_history` system attrs exactly as Optuna's own heartbeat writes them.
"""

from __future__ import annotations

import os
import socket
import time

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from study.quiet import experimental
from study.store.base import Store

# "host boot-id pid start-ticks" of the process that keeps a trial alive (the batched engine's
# writer, the standard engine's process): a pid reused after a restart or a reboot differs in
# its start time or boot id.
OWNER_ATTR = "sinstudy:owner"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str | None:
    """The process's start time since boot (clock ticks), None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]  # field 22 of proc(5); a zombie is gone


def owner_attr(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()} {_boot_id()} {pid} {_start_ticks(pid) or ''}"


def owner_gone(owner: object) -> bool:
    """True when `owner` names a process of this machine (this boot) that no longer runs.
    False for another machine, or where /proc cannot tell (the heartbeat rule decides)."""
    parts = owner.split(" ") if isinstance(owner, str) else []
    if len(parts) != 4 or not parts[1] or not parts[3]:
        return False
    host, boot, pid, ticks = parts
    if host != socket.gethostname() or boot != _boot_id():
        return False
    return _start_ticks(int(pid)) != ticks


class StaleRetry:
    """The stale-trial callback an RDB storage is opened with: its retry limit and the trials
    this process failed (so a sweep can name them, not those another engine failed at the same
    moment). Our storages (rdb.SweepingStorage) fail and retry as one step and record the
    numbers here themselves; Optuna would call it, as RetryHeartbeatStaleTrialCallback, only on
    a storage that left the failing to Optuna."""

    def __init__(self, max_retries: int):
        with experimental():  # experimental in Optuna 5.0; its behaviour is what we want
            self._retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retries)
        self.max_retries = max_retries
        self.failed: list[int] = []

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._retry(study, trial)
        self.failed.append(trial.number)


def fail_and_retry(store: Store, study: optuna.Study, trial_number: int, max_retries: int) -> bool:
    """Mark a RUNNING trial of `study` (stored in `store`) FAIL and enqueue its params once more
    (up to max_retries times), as one step of the store (`Store.fail_and_retry`): no FAIL
    without its retry.

    Returns False when the trial was no longer RUNNING (it finished, or another process failed
    it first): then nothing is changed.
    """
    trial = _by_number(study, trial_number)
    if trial is None:
        return False
    return store.fail_and_retry(study._study_id, trial, max_retries)


def retry_chain(system_attrs: dict) -> set[int]:
    """The numbers of the trial a queued retry repeats and of that trial's earlier retries
    (Optuna's `failed_trial` / `retry_history`); empty for any other trial. They may share the
    retry's seeds."""
    if "failed_trial" not in system_attrs:
        return set()
    return {system_attrs["failed_trial"], *system_attrs.get("retry_history", ())}


def stored_trial(study: optuna.Study, number: int) -> FrozenTrial | None:
    """Trial `number` as stored (one trial read, not the study's trials); None if none."""
    try:
        tid = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    except KeyError:
        return None
    return study._storage.get_trial(tid)


def _by_number(study: optuna.Study, number: int) -> FrozenTrial | None:
    """The trial if it is RUNNING."""
    trial = stored_trial(study, number)
    return trial if trial is not None and trial.state == TrialState.RUNNING else None


def sweep_stale(
    store: Store, study: optuna.Study, *, grace_period: float, max_retries: int
) -> dict[int, str]:
    """Fail (and retry) trials whose worker is gone: at once where it ran on this machine, else
    after `grace_period` without a heartbeat (the store's rule: Optuna's heartbeat on an RDB,
    ours on the journal). Returns {trial number: why} for the trials this call failed."""
    gone = [n for n, owner in store.running_attr(study, OWNER_ATTR).items() if owner_gone(owner)]
    out = {
        n: "its process on this machine is gone"
        for n in gone
        if fail_and_retry(store, study, n, max_retries)
    }
    for n in _silent(store, study, grace_period, max_retries):
        out[n] = f"no heartbeat for {grace_period} s"
    return dict(sorted(out.items()))


def outage_silenced(store: Store, grace_period: float) -> bool:
    """Did an outage end less than `grace_period` ago? Then a trial's silence may be the
    outage's, and no trial is failed for it yet."""
    return time.time() - store.outage.quiet_since() < grace_period


def _silent(store: Store, study: optuna.Study, grace_period: float, max_retries: int) -> list[int]:
    """The silent trials this call failed. On an RDB, Optuna's check finds them and the
    storage fails and retries them (rdb.SweepingStorage); on the journal, this does. None
    within `grace_period` of the end of an outage this process waited out: every heartbeat
    stopped with it (study.store.outage)."""
    if outage_silenced(store, grace_period):
        return []
    silent = store.silent(study, grace_period)
    if store.optuna_sweeps:
        return silent
    return [n for n in silent if fail_and_retry(store, study, n, max_retries)]
