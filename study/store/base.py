"""The storage interface: what both engines need of a study's storage, one class per backend.

A `Store` wraps an Optuna storage (`optuna`, what Optuna's own API, the samplers and the
dashboard use) and adds the steps the engines take in bulk or under a lock: add trials, take a
queued trial, claim a seed, append values, finish trials, beat, read what changed since a mark,
and the heartbeat rule of the stale-trial sweep. Each step is one transaction (an RDB) or one
hold of the file lock (the journal), so what it checks still holds when it writes.

This class implements every step through Optuna's public storage API, one call at a time: the
form an in-memory study (one process, nothing to race) uses, and the journal's, which wraps
the same calls in its file lock. `study.store.rdb` replaces them with bulk SQL for SQLite and
PostgreSQL. What is written is what Optuna's own calls write (the field-by-field tests in
tests/test_bulk.py compare them).
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any, ClassVar, TypeVar

import optuna
from optuna.trial import FrozenTrial, TrialState

from study.errors import StorageError
from study.store.outage import Outage
from study.store.url import Heartbeat, StorageURL
from study.trial.space import param_set

T = TypeVar("T")
HEARTBEAT_ATTR = "sinstudy:heartbeat"  # unix time of a journal trial's last beat
UNFINISHED = (TrialState.RUNNING, TrialState.WAITING)


@dataclass(frozen=True)
class Taken:
    """What a new trial may not repeat: parameter sets others train or trained (FAIL trials'
    excepted: retries repeat those) and weight seeds others used (FAIL trials' included)."""

    params: frozenset = frozenset()
    seeds: frozenset = frozenset()

    def __or__(self, other: Taken) -> Taken:
        return Taken(self.params | other.params, self.seeds | other.seeds)

    def refuses(self, t: FrozenTrial, seeds: range | None) -> bool:
        """`seeds`: the trial's weight seeds (None: not checked)."""
        return (seeds is not None and meets(self.seeds, seeds)) or bool(
            t.params and self.params and param_set(t.params, t.distributions) in self.params
        )

    @classmethod
    def of(cls, trials: Iterable[FrozenTrial]) -> Taken:
        params, seeds = set(), set()
        for t in trials:
            if t.params and t.state != TrialState.FAIL:
                params.add(param_set(t.params, t.distributions))
            if isinstance(t.user_attrs.get("seed"), int):
                seeds.add(t.user_attrs["seed"])
        return cls(frozenset(params), frozenset(seeds))


NOTHING_TAKEN = Taken()


class Take(Enum):
    TAKEN = "taken"
    GONE = "gone"  # no longer WAITING: another engine took it, or it finished
    SEED = "seed"  # another trial holds one of its seeds: left WAITING


@dataclass(frozen=True)
class Ending:
    """How one running trial ends (finish_trials)."""

    trial_id: int
    state: TrialState
    value: float | None
    values: dict[int, float]  # intermediate values not stored yet
    user_attrs: dict[str, Any]
    system_attrs: dict[str, Any]
    completed: datetime
    rest: tuple[float, ...] = ()  # the values after the first, in a study of two objectives

    @property
    def stored_values(self) -> list[float] | None:
        return None if self.value is None else [self.value, *self.rest]


def meets(held: Container[int], seeds: range) -> bool:
    """Do `seeds` meet those of trials whose first seeds are `held`? Every trial of a study
    trains as many, from its first, so another's first seed meets them if it lies less than
    that many below them or among them."""
    return any(h in held for h in range(seeds.start - len(seeds) + 1, seeds.stop))


def seed_attrs(seeds: range) -> dict[str, Any]:
    return {"seed": seeds.start} | ({"seeds": list(seeds)} if len(seeds) > 1 else {})


def pick_seeds(held: Container[int], candidates: Iterable[int], repeats: int) -> range:
    for first in candidates:
        if not meets(held, seeds := range(first, first + repeats)):
            return seeds
    raise ValueError("no free seed among the candidates")


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, what it was raised from or during, and the driver's own error a SQLAlchemy error
    wraps (`orig`), each once, nearest first."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [getattr(e, "orig", None), e.__cause__, e.__context__]


def retry_of(trial: FrozenTrial, max_retries: int) -> FrozenTrial | None:
    """The WAITING trial that retries failed `trial`, as Optuna's RetryFailedTrialCallback makes
    it (params, distributions, user attrs; `failed_trial`: the first failed trial's number,
    `retry_history`: every failed try's), or None when its retries are spent."""
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if max_retries < len(history):
        return None
    return optuna.trial.create_trial(
        state=TrialState.WAITING,
        params=trial.params,
        distributions=trial.distributions,
        user_attrs=trial.user_attrs,
        system_attrs={
            "failed_trial": trial.number,
            **trial.system_attrs,
            "retry_history": history,
        },
    )


def disk_full(path: object) -> str:
    """The line for a storage file its disk has no room for."""
    fix = "free space on its disk or give --storage another place"
    return f"disk full: cannot write {path}; {fix}"


class Store:
    """A study's storage with the engines' steps (see the module's docstring). `kind` names the
    backend (sqlite, postgresql, journal; memory for an in-memory study)."""

    kind: ClassVar[str] = "memory"

    def __init__(
        self,
        storage: optuna.storages.BaseStorage,
        url: StorageURL | None = None,
        heartbeat: Heartbeat | None = None,
        *,
        read_only: bool = False,
    ):
        self.optuna = storage
        self.url, self.heartbeat, self.read_only = url, heartbeat, read_only
        self.outage = Outage(heartbeat.outage if heartbeat is not None else 0.0)

    def __reduce__(self):
        """A store opened from a URL travels to a spawned process as how it was opened, and is
        opened there again (its connections and locks are this process's)."""
        if self.url is None:
            raise TypeError("only a store opened from a URL (study.store.open_store) travels")
        return _reopen, (type(self), self.url, self.heartbeat, self.read_only)

    # ------------------------------------------------------------------ what a run is told

    def opening_notes(self) -> list[str]:
        """Lines a run prints before it starts (a repaired or damaged file)."""
        return []

    def reading_notes(self) -> list[str]:
        """Lines a reader prints (lines of the file it skipped)."""
        return []

    def advice(self, workers: int) -> list[str]:
        """A faster storage for this many workers, if there is one."""
        return []

    # ------------------------------------------------------------------ what went wrong

    def fault(self, exc: BaseException) -> str | None:
        """One line naming what failed underneath `exc` when it is the storage's environment
        (a full disk, a database that cannot be reached), with the fix; None for anything
        else. Optuna wraps such failures in words about invalid data; this says what it was.
        A full disk is named only with its file: a write error that names none may have been
        another folder's (TensorBoard's, the artifacts')."""
        for e in causes(exc):
            if isinstance(e, OSError) and e.errno == errno.ENOSPC and e.filename:
                return disk_full(e.filename)
        return None

    def transient(self, exc: BaseException) -> str | None:
        """The `fault` line when the fault is one a wait can outlast and a step can be tried
        again after it (study.store.outage); None for anything else. Here (an in-memory study,
        the journal, whose appends a full disk can cut): none."""
        return None

    def waiting(self, step: Callable[[bool], T]) -> T:
        """`step(again)` under this process's outage rule (study.store.outage)."""
        return self.outage.run(step, self.transient)

    @contextlib.contextmanager
    def naming_faults(self) -> Iterator[None]:
        """A failure of the storage's environment inside the block (`fault`) leaves it as a
        StorageError with that one line (exit status 1), not as Optuna's words for it."""
        try:
            yield
        except StorageError:  # already one line (an outage waited out past its bound)
            raise
        except Exception as e:
            # one under what Optuna's trial loop raised while it ended the trial
            said = next((c for c in causes(e) if isinstance(c, StorageError)), None)
            if said is not None:
                raise StorageError(str(said), exit_code=said.exit_code) from e
            line = self.fault(e)
            if line is None:
                raise
            raise StorageError(line, exit_code=1) from e

    # ------------------------------------------------------------------ writes

    def _locked(self) -> AbstractContextManager:
        """What makes a check and the write after it one step: nothing in one process."""
        return nullcontext()

    def _trials(self, study_id: int) -> list[FrozenTrial]:
        return self.optuna.get_all_trials(study_id, deepcopy=False)

    def _held_seeds(self, study_id: int, trial_id: int, chain: Container[int]) -> set[int]:
        return {
            t.user_attrs["seed"]
            for t in self._trials(study_id)
            if t._trial_id != trial_id
            and t.number not in chain
            and isinstance(t.user_attrs.get("seed"), int)
        }

    def add_trial(self, study_id: int, trial: FrozenTrial) -> tuple[int, int]:
        """Store one trial (any state). Returns (trial_id, number)."""
        return self.add_trials(study_id, [trial], heartbeat=False)[0]

    def add_trials(
        self,
        study_id: int,
        trials: list[FrozenTrial],
        *,
        heartbeat: bool,
        after_id: int | None = None,
        taken: Taken = NOTHING_TAKEN,
        own: Container[int] = frozenset(),
        seeds: list[range | None] | None = None,
        recheck: Iterable[int] = (),
    ) -> list[tuple[int, int] | None]:
        """Store `trials` as new trials of the study, numbered in list order, in one step.
        Returns (trial_id, number) per trial, or None for a trial not stored because another
        engine already has its parameter set or one of its weight seeds (`seeds`, one range per
        trial; None: no check): one in `taken`, or one of a trial stored by someone else (not
        in `own`) after trial id `after_id` (-1: any; None: no look) or in `recheck` (trials
        seen before their params or seed were stored), checked under the study lock.
        `heartbeat`: give each a heartbeat, which the stale-trial check needs to see it."""
        seeds = seeds or [None] * len(trials)
        with self._locked():
            if after_id is not None:
                look = set(recheck)
                others = [
                    t
                    for t in self._trials(study_id)
                    if (t._trial_id > after_id or t._trial_id in look) and t._trial_id not in own
                ]
                taken = taken | Taken.of(others)
            out: list[tuple[int, int] | None] = []
            for t, seed in zip(trials, seeds, strict=True):
                if taken.refuses(t, seed):
                    out.append(None)
                    continue
                trial_id = self.optuna.create_new_trial(study_id, template_trial=t)
                out.append((trial_id, self.optuna.get_trial_number_from_id(trial_id)))
            return out

    def claim_seed(
        self,
        study_id: int,
        trial_id: int,
        candidates: Iterable[int],
        *,
        repeats: int,
        chain: Container[int] = frozenset(),
    ) -> int:
        """Store trial `trial_id`'s first weight seed: the first of `candidates` whose seeds (it
        and the `repeats - 1` after it) no other trial's seeds meet, checked and written in one
        step under the study lock, so a stored seed is always a checked one. `chain`: trial
        numbers whose seeds this trial may share (the trial it retries and that one's earlier
        retries)."""
        with self._locked():
            seeds = pick_seeds(self._held_seeds(study_id, trial_id, chain), candidates, repeats)
            for key, value in seed_attrs(seeds).items():
                self.optuna.set_trial_user_attr(trial_id, key, value)
        return seeds.start

    def take_queued(
        self,
        study_id: int,
        trial_id: int,
        seeds: range | None,
        *,
        chain: Container[int] = frozenset(),
    ) -> Take:
        """Take a WAITING trial as Optuna's ask() does (its state RUNNING, its start now) and
        store its weight seeds, in one step under the study lock with the check that no other
        trial's seeds meet them (`seeds` None: no check, no seed stored). `chain`: as in
        `claim_seed`."""
        with self._locked():
            if self.optuna.get_trial(trial_id).state != TrialState.WAITING:
                return Take.GONE
            if seeds is not None and meets(self._held_seeds(study_id, trial_id, chain), seeds):
                return Take.SEED
            if not self.optuna.set_trial_state_values(trial_id, TrialState.RUNNING):
                return Take.GONE
            if seeds is not None:
                for key, value in seed_attrs(seeds).items():
                    self.optuna.set_trial_user_attr(trial_id, key, value)
        return Take.TAKEN

    def fail_and_retry(self, study_id: int, trial: FrozenTrial, max_retries: int) -> bool:
        """Mark RUNNING `trial` FAIL and, while retries remain, queue its retry (`retry_of`) as
        one step: no FAIL trial without its retry, whatever fails in between. False, and
        nothing written, when the trial is no longer RUNNING.

        Here (the journal): under one hold of the file lock, the retry first, then the FAIL;
        a process that dies between the two leaves the trial RUNNING with its retry queued, and
        the sweep that fails it later finds that retry and queues no second one."""
        retry = retry_of(trial, max_retries)
        with self._locked():
            if self.optuna.get_trial(trial._trial_id).state != TrialState.RUNNING:
                return False
            if retry is not None and not self._retry_queued(study_id, trial.number):
                self.optuna.create_new_trial(study_id, template_trial=retry)
            try:
                return self.optuna.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                return False

    def _retry_queued(self, study_id: int, number: int) -> bool:
        return any(
            t.system_attrs.get("retry_history", [None])[-1] == number
            for t in self._trials(study_id)
        )

    def append_values(self, values: dict[int, dict[int, float]]) -> None:
        """New intermediate values {trial_id: {step: value}} of running trials, in one step. A
        trial another process finished meanwhile (a sweep, optuna-dashboard's FAIL) gets none
        of them, whenever that process finished it: no value is ever stored after a trial's end
        (Optuna's API keeps that rule; so does the journal's replay, which drops a record
        written after the trial's end). The writer's next sync stops the trial."""
        for tid, steps in values.items():
            try:
                for step, v in steps.items():
                    self.optuna.set_trial_intermediate_value(tid, step, v)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue

    def finish_trial(self, trial_id: int, **ending: Any) -> bool:
        """End one running trial (finish_trials)."""
        return self.finish_trials([Ending(trial_id, **ending)])[0]

    def finish_trials(self, endings: list[Ending]) -> list[bool]:
        """End running trials: their remaining intermediate values, attrs (replacing those of
        the same key), value and state. Per trial, False and nothing written when it had
        already been finished (e.g. failed as stale by another engine)."""
        return [self._finish(e) for e in endings]

    def _finish(self, e: Ending) -> bool:
        try:
            self.append_values({e.trial_id: e.values})
            for k, v in e.user_attrs.items():
                self.optuna.set_trial_user_attr(e.trial_id, k, v)
            for k, v in e.system_attrs.items():
                self.optuna.set_trial_system_attr(e.trial_id, k, v)
            return self.optuna.set_trial_state_values(e.trial_id, e.state, e.stored_values)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False

    # ------------------------------------------------------------------ heartbeats

    def heartbeat_attrs(self) -> dict[str, Any]:
        """System attrs a new trial carries for its heartbeat (the journal's first beat)."""
        return {}

    def beat(self, trial_ids: Iterable[int]) -> None:
        """A heartbeat for each running trial (a trial finished meanwhile is left alone)."""
        now = time.time()
        for tid in trial_ids:
            try:
                self.optuna.set_trial_system_attr(tid, HEARTBEAT_ATTR, now)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass

    def start_beat(self, trial_id: int) -> None:
        """The first heartbeat of a queued trial just taken."""
        self.beat([trial_id])

    @contextlib.contextmanager
    def beating(self, trial_id: int, interval: float) -> Iterator[None]:
        """Beat one trial every `interval` s while the block runs (the standard engine's
        trial), where Optuna's study.optimize does not do it itself."""
        yield

    @property
    def optuna_sweeps(self) -> bool:
        """Does Optuna's study.optimize fail this storage's stale trials itself?"""
        return False

    def heartbeat_ages(self, trials: list[FrozenTrial]) -> dict[int, float]:
        """Seconds since each running trial's last heartbeat, by number (trials without one are
        left out)."""
        now = time.time()
        return {
            t.number: now - t.system_attrs[HEARTBEAT_ATTR]
            for t in trials
            if isinstance(t.system_attrs.get(HEARTBEAT_ATTR), int | float)
        }

    def silent(self, study: optuna.Study, grace_period: float) -> list[int]:
        """Numbers of RUNNING trials without a heartbeat for `grace_period` s (a trial never
        beaten counts from its start)."""
        now = time.time()
        out = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            beat = t.system_attrs.get(HEARTBEAT_ATTR)
            if beat is None and t.datetime_start is not None:
                beat = t.datetime_start.timestamp()
            if beat is not None and now - beat > grace_period:
                out.append(t.number)
        return out

    # ------------------------------------------------------------------ reads

    def running_attr(self, study: optuna.Study, key: str) -> dict[int, Any]:
        """{number: system attr `key` or None} of the study's RUNNING trials."""
        return {
            t.number: t.system_attrs.get(key)
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        }

    def changes(
        self,
        study_id: int,
        max_id: int,
        unfinished: Mapping[int, TrialState],
        skip: Container[int] = (),
        user_keys: Iterable[str] | None = None,
    ) -> list[FrozenTrial]:
        """Trials stored after `max_id` and those of `unfinished` (the caller filters those whose
        state did not change), in id order: what a mirror needs of the other engines' trials."""
        return [
            t for t in self._trials(study_id) if t._trial_id > max_id or t._trial_id in unfinished
        ]

    def trial_states(self, study_id: int, trial_ids: Iterable[int]) -> dict[int, TrialState]:
        """The stored state of each trial."""
        ids = set(trial_ids)
        return {t._trial_id: t.state for t in self._trials(study_id) if t._trial_id in ids}


def _reopen(kind: type[Store], url: StorageURL, heartbeat: Heartbeat | None, read_only: bool):
    return kind.open(url, heartbeat, read_only=read_only)
