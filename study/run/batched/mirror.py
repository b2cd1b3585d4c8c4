"""The batched engine's in-memory copy of the stored study, where the sampler and the pruner run.

On an RDB storage, Optuna's report() + should_prune() are database round trips per trial per epoch,
and TPE's ask reads the whole study: more than an epoch of a whole stack. On the mirror (Optuna's
in-memory storage) each is a few dict operations (docs/design.md has the figures). The mirror holds
every stored trial, in number order, so a trial asked here gets the number the storage will give it
when one engine runs (trial k then trains with seed + k); other engines' trials arrive through the
writer's sync (new ones, and changes of state), so the sampler sees their finished trials and, for
TPE's constant liar, their running ones. WAITING trials (enqueue_trial, retries of crashed trials)
are in the mirror as WAITING, so the mirror's ask() takes them first, as Optuna's does; the writer
then takes the stored trial atomically.
"""

from __future__ import annotations

import math

import optuna
from optuna.trial import FrozenTrial, TrialState

from study.config import StudyConfig
from study.quiet import experimental
from study.run.batched.messages import Known, Queued
from study.run.search import make_pruner, make_sampler
from study.trial.objectives import directions
from study.trial.space import param_set


class Mirror:
    def __init__(self, cfg: StudyConfig, stored: list[FrozenTrial], *, seed: int):
        with experimental():
            # Same name as the stored study: Hyperband assigns brackets by a hash of name and
            # number.
            self.study = optuna.create_study(
                study_name=cfg.study,
                directions=directions(cfg),
                sampler=make_sampler(cfg, seed=seed, stored=len(stored)),
                pruner=make_pruner(cfg),
            )
        self._storage, self._id = self.study._storage, self.study._study_id
        # stored trial_id -> mirror trial_id, others' RUNNING/WAITING
        self.unfinished: dict[int, int] = {}
        # mirror trial_id -> the stored WAITING trial
        self.waiting: dict[int, Queued] = {}
        self.seeds: dict[int, int] = {}  # stored number -> weight seed, of every stored trial seen
        self.reseeded = False
        for t in sorted(stored, key=lambda t: t.number):
            self._add(t)
        self.known = Known(
            max((t._trial_id for t in stored), default=-1),
            {
                t._trial_id: t.state
                for t in stored
                if t.state in (TrialState.RUNNING, TrialState.WAITING)
            },
            frozenset(
                t.user_attrs["seed"] for t in stored if isinstance(t.user_attrs.get("seed"), int)
            ),
            frozenset(
                t._trial_id
                for t in stored
                if t.state == TrialState.RUNNING and not (t.params and "seed" in t.user_attrs)
            ),
            frozenset(
                param_set(t.params, t.distributions)
                for t in stored
                if t.params and t.state != TrialState.FAIL
            ),
            min((t.values[0] for t in stored if t.state == TrialState.COMPLETE), default=math.inf),
        )

    def _add(self, t: FrozenTrial) -> None:
        if isinstance(t.user_attrs.get("seed"), int):
            self.seeds[t.number] = t.user_attrs["seed"]
        mirror_id = self._storage.create_new_trial(self._id, template_trial=t)
        if t.state in (TrialState.RUNNING, TrialState.WAITING):
            self.unfinished[t._trial_id] = mirror_id
        if t.state == TrialState.WAITING:
            self.waiting[mirror_id] = Queued(t._trial_id, t.number)

    def retried(self, trial: optuna.Trial) -> int | None:
        """The stored number of the trial that `trial` (a queued retry) repeats, else None."""
        return self._storage.get_trial(trial._trial_id).system_attrs.get("failed_trial")

    def ask(self) -> tuple[optuna.Trial, Queued | None]:
        """A trial to start, and the stored WAITING trial it is, if it is one to take."""
        trial = self.study.ask()
        queued = self.waiting.pop(trial._trial_id, None)
        if queued is not None:
            del self.unfinished[queued.trial_id]
        return trial, queued

    def apply(self, trials: list[FrozenTrial]) -> None:
        """Other engines' new or changed trials, from the writer's sync."""
        for t in trials:
            mirror_id = self.unfinished.get(t._trial_id)
            if mirror_id is None:
                self._add(t)
                continue
            if t.state == TrialState.WAITING:
                continue
            self.waiting.pop(mirror_id, None)
            if t.state == TrialState.RUNNING:  # taken from the queue by another engine
                self._storage.set_trial_state_values(mirror_id, TrialState.RUNNING)
                continue
            self._finish(mirror_id, t)
            del self.unfinished[t._trial_id]

    def _finish(self, mirror_id: int, t: FrozenTrial) -> None:
        if isinstance(t.user_attrs.get("seed"), int):  # a trial first seen before its attrs
            self.seeds[t.number] = t.user_attrs["seed"]
        s = self._storage
        if s.get_trial(mirror_id).state == TrialState.WAITING:
            s.set_trial_state_values(mirror_id, TrialState.RUNNING)
        for name, value in t.params.items():
            if name not in s.get_trial(mirror_id).params:
                s.set_trial_param(
                    mirror_id,
                    name,
                    t.distributions[name].to_internal_repr(value),
                    t.distributions[name],
                )
        for step, v in t.intermediate_values.items():
            s.set_trial_intermediate_value(mirror_id, step, v)
        for k, v in t.system_attrs.items():
            s.set_trial_system_attr(mirror_id, k, v)
        s.set_trial_state_values(mirror_id, t.state, t.values)

    def lost(self, trial: optuna.Trial, queued: Queued | None) -> None:
        """The writer could not start `trial`: a queued trial another engine took first (it is
        that engine's running trial now), or a parameter set another engine already trains (a
        duplicate: failed here, so the sampler moves on)."""
        if queued is not None:
            self.unfinished[queued.trial_id] = trial._trial_id
        else:
            self.tell(trial, None, TrialState.FAIL)

    def requeue(self, trial: optuna.Trial, queued: Queued) -> None:
        """The writer left `queued` WAITING (another trial holds the seeds this engine was to
        train it with): this attempt ends FAIL here, its curve with it, and a fresh copy of
        the queued trial waits to be asked again."""
        old = self.frozen(trial)
        if not old.state.is_finished():  # it may have ended here before the writer's answer
            self.tell(trial, None, TrialState.FAIL)
        copy = FrozenTrial(
            number=0,  # the storage numbers it
            state=TrialState.WAITING,
            value=None,
            datetime_start=None,
            datetime_complete=None,
            params=dict(old.params),
            distributions=dict(old.distributions),
            user_attrs=dict(old.user_attrs),
            system_attrs=dict(old.system_attrs),
            intermediate_values={},
            trial_id=0,
        )
        mirror_id = self._storage.create_new_trial(self._id, template_trial=copy)
        self.unfinished[queued.trial_id] = mirror_id
        self.waiting[mirror_id] = queued

    def collided(self) -> None:
        """Another engine proposes what this one proposes (the same seed, started at the same
        moment): from now on this sampler draws from fresh OS entropy instead."""
        if not self.reseeded:
            self.reseeded = True
            self.study.sampler.reseed_rng()

    def tell(
        self, trial: optuna.Trial, value: float | list[float] | None, state: TrialState
    ) -> None:
        try:
            self.study.tell(trial, value, state=state)
        except RuntimeError as e:  # GridSampler calls study.stop() when its grid is done; the
            if "Study.stop" not in str(e):  # trial's state is already stored (tell's finally)
                raise

    def frozen(self, trial: optuna.Trial) -> FrozenTrial:
        """The trial as stored here (not a copy: read it, do not change it)."""
        return self._storage.get_trial(trial._trial_id)

    def system_attrs(self, trial: optuna.Trial) -> dict:
        return dict(self._storage.get_trial(trial._trial_id).system_attrs)
