"""The batched engine's contract: what the trainer hands its writer process and what comes back.

Both sides import these types and dispatch on them with `match`. Everything is plain data
(weights as arrays, no storage or tensor handles), so a writer can store what it was handed
after its trainer died. A trial is named by its `handle` (its number in the trainer's mirror)
until the writer says which `number` storage gave it.

Trainer -> writer, in order on one queue:
  `Starts`   trials just asked, created RUNNING in one transaction (or queued ones taken);
  `Curves`   intermediate values not flushed yet, about once a second;
  `Finish`   a trial that ended, whole (consecutive ones are stored in one transaction);
  `Close`    no more jobs: finish them, update the study note if `publish`, and end.
Writer -> trainer:
  `Started`, `Lost`        the fate of each start;
  `Written`, `Dropped`     the fate of each finish (dropped: it was never stored, or another
                           process failed it while it trained);
  `Failed`                 a trial of ours another process failed while it trains: stop it;
  `Synced`                 trials other engines stored or changed, for the mirror;
  `WriterFailed`, `Closed` the writer's end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from optuna.trial import FrozenTrial, TrialState

from study.config import TrainConfig
from study.trial.train import EpochLog
from study.views.artifacts import State


class Queued(NamedTuple):
    """A WAITING trial of the stored study (enqueue_trial, a retry) that the mirror handed out."""

    trial_id: int
    number: int


@dataclass(frozen=True)
class Known:
    """The stored trials the engine's mirror was loaded with (trial ids)."""

    max_id: int
    unfinished: dict[int, TrialState]  # RUNNING / WAITING trials of others
    seeds: frozenset[int] = frozenset()  # weight seeds the stored trials used
    incomplete: frozenset[int] = frozenset()  # RUNNING trials stored without params or seed
    params: frozenset[frozenset] = frozenset()  # parameter sets of the stored trials (not FAIL)
    best: float = math.inf  # the best value of the stored COMPLETE trials


# ------------------------------------------------------------------ trainer -> writer


@dataclass
class Start:
    handle: int
    trial: FrozenTrial  # RUNNING: params, distributions, user and system attrs, datetime_start
    queued: int | None = None  # storage trial_id of a WAITING trial to take; None: a new trial
    seed: int | None = None  # its weight seed, unique in the study (None: shared on purpose)


@dataclass
class Starts:
    starts: list[Start]  # one fill's


@dataclass
class Curves:
    values: dict[int, dict[int, float]]  # handle -> {epoch: validation MSE}


@dataclass
class Finish:
    """One ended trial as the engine hands it over."""

    handle: int
    state: TrialState
    value: float | None  # its validation MSE (the first objective)
    values: dict[int, float]  # intermediate values not flushed yet
    attrs: dict
    system_attrs: dict  # the pruner's (rungs), for other engines' pruners
    completed: datetime
    # TensorBoard points, wall time
    epochs: list[tuple[EpochLog, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # TensorBoard HParams metrics
    model: State | None = None  # a new best's weights, stored as an artifact
    tcfg: TrainConfig | None = None
    rest: tuple[float, ...] = ()  # values after the first (n_params, with two objectives)


@dataclass
class Close:
    publish: bool  # update the study note the dashboard shows


Job = Starts | Curves | Finish | Close


# ------------------------------------------------------------------ writer -> trainer


@dataclass
class Started:
    handle: int
    number: int  # its number in storage


@dataclass
class Lost:
    """A start the writer could not store; its budget claim went back."""

    handle: int
    why: str
    collided: bool  # another engine has its parameter set or seed (rather than its queued trial)
    waiting: bool = False  # a queued trial left WAITING: another trial holds its seeds


@dataclass
class Written:
    handle: int
    number: int
    state: TrialState
    value: float | None  # None for a non-finite value


@dataclass
class Dropped:
    handle: int


@dataclass
class Failed:
    """A trial of this engine that another process finished while it trained (a sweep that
    found no heartbeat, optuna-dashboard's "Fail trial"); its budget claim went back."""

    handle: int
    number: int


@dataclass
class Synced:
    trials: list[FrozenTrial]  # other engines' new or changed trials (maybe none)


@dataclass
class WriterFailed:
    message: str  # one line, naming the cause


@dataclass
class Closed:
    pass


Reply = Started | Lost | Written | Dropped | Failed | Synced | WriterFailed | Closed
