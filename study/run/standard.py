"""The standard engine: Optuna's own `study.optimize`, one trial at a time per process.

`Objective` is a plain Optuna objective: suggest -> train -> report/prune per epoch -> value.
Each epoch's validation MSE is reported (so the dashboard and the pruner see the whole curve)
and `TrialPruned` is raised when the pruner says so. A diverged trial (non-finite loss, e.g. the
report's lr = 0.01 runs at depth) ends PRUNED with the reason in the user attr `pruned_reason`,
never as a crash. It is the reference for the batched engine, and the engine for users who
bring their own objective.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable

import optuna
from optuna.trial import TrialState

from study import store as store_mod
from study.config import StudyConfig, TrainConfig
from study.run import interrupt
from study.run.ledger import give_back
from study.run.opening import Run
from study.store.recovery import (
    OWNER_ATTR,
    owner_attr,
    retry_chain,
    stored_trial,
    sweep_stale,
)
from study.trial import objectives
from study.trial.attrs import (
    EXHAUSTED,
    MAX_LOST,
    WORKER,
    fresh_stream,
    outcome,
    start_attrs,
    trial_configs,
    trial_seed,
)
from study.trial.data import SinData, make_data
from study.trial.objectives import count_params
from study.trial.space import grid_started, param_set
from study.trial.train import EpochLog, train, train_repeats
from study.views.artifacts import ArtifactFolder, model_state, store_model
from study.views.dashboard import publish as publish_note
from study.views.tracking import TrialLogger, trial_metrics

CHECK_S = 2.0  # how often a training trial's stored state is read (failed from outside?)


class FinishedElsewhere(Exception):
    """Another process finished the training trial; it stops, and counts for nothing here."""


class DuplicateTrial(Exception):
    """Another engine trains this trial's parameter set: the trial ends FAIL, counting nothing."""


class Objective:
    def __init__(self, cfg: StudyConfig, data: SinData, artifact_store: ArtifactFolder | None):
        self.cfg = cfg
        self.data = data
        self.artifact_store = artifact_store
        # For the benchmark's bookkeeping share: time inside __call__, and the part of it spent
        # on reporting, pruning decisions and TensorBoard (the rest of a run is ask/tell).
        self.seconds_inside = 0.0
        self.seconds_reporting = 0.0
        self.duplicates = 0  # trials ended FAIL as DuplicateTrial
        self.checked = time.monotonic()  # when the running trial's stored state was last read
        self.trial: optuna.Trial | None = None  # the last trial it was called with

    def __call__(self, trial: optuna.Trial) -> float:
        self.trial = trial
        start = time.perf_counter()
        try:
            return self._trial(trial)
        except DuplicateTrial:
            self.duplicates += 1
            raise
        finally:
            self.seconds_inside += time.perf_counter() - start

    def _trial(self, trial: optuna.Trial) -> float:
        tcfgs = self._unique(trial)
        tcfg = tcfgs[0]
        logger = TrialLogger(self.cfg.log_dir, self.cfg.study, trial.number)
        last = {"val_mse": float("inf"), "epoch": 0}

        def on_epoch(log: EpochLog) -> None:
            interrupt.check()  # Ctrl-C / SIGTERM: stop here, between epochs
            self._check_running(trial)
            t0 = time.perf_counter()
            logger.log_epoch(log)
            last.update(val_mse=log.val_mse, epoch=log.epoch)
            objectives.report(trial, log.val_mse, log.epoch)
            prune = objectives.should_prune(trial)
            self.seconds_reporting += time.perf_counter() - t0
            if prune:
                trial.set_user_attr("pruned_reason", f"pruner stopped it after epoch {log.epoch}")
                raise optuna.TrialPruned(f"pruned after epoch {log.epoch}")

        hparams = dict(trial.params)
        size = {"n_params": count_params(tcfg.widths)}  # known before training
        try:
            if len(tcfgs) == 1:
                results = [train(tcfg, self.data, on_epoch=on_epoch)]
            else:  # the seeds in lockstep: the pruner sees their mean curve
                results = train_repeats(tcfgs, self.data, on_epoch=on_epoch)
        except optuna.TrialPruned:
            logger.close(hparams, trial_metrics(last["val_mse"], size), "PRUNED")
            raise
        except BaseException:  # interrupted or failed: keep the curve written so far
            logger.end()
            raise
        out = outcome(results, tcfgs)
        logger.close(
            hparams, trial_metrics(out.value, out.attrs), "PRUNED" if out.diverged else "COMPLETE"
        )

        for k, v in out.attrs.items():
            trial.set_user_attr(k, v)
        if out.diverged:
            trial.set_user_attr("pruned_reason", out.diverged)
            raise optuna.TrialPruned(out.diverged)
        if self.artifact_store is not None and _is_new_best(trial, out.value):
            kept = store_model(
                self.artifact_store,
                trial,
                trial.number,
                out.model_cfg,
                model_state(out.model),
                scaling=self.cfg.data.input_scaling,
            )
            for k, v in kept.items():
                trial.set_user_attr(k, v)
        if objectives.multi(self.cfg):
            return objectives.values(self.cfg, out.value, out.attrs["n_params"])
        return out.value

    def _check_running(self, trial: optuna.Trial) -> None:
        """Every CHECK_S: is the trial still RUNNING in storage? Another process may have
        finished it (optuna-dashboard's "Fail trial", a sweep): then stop training it."""
        now = time.monotonic()
        if now - self.checked < CHECK_S:
            return
        self.checked = now
        state = trial.study._storage.get_trial(trial._trial_id).state
        if state.is_finished():
            raise FinishedElsewhere(f"trial #{trial.number} was marked {state.name} elsewhere")

    def _unique(self, trial: optuna.Trial) -> list[TrainConfig]:
        """What the trial trains: a retry with the seeds of the trial it repeats, any other
        trial with seed + S * its number. Its parameter set is stored (Optuna's suggest), then
        checked against every other engine's trial: another engine may have stored the same
        one meanwhile (Optuna's ask has no such check, and a batched engine checks only what
        is stored when it creates its trials). A parameter set another trial trains or trained
        ends this one FAIL (DuplicateTrial: the loop gives its budget back and reseeds the
        sampler). The seed is checked and stored in one step (Store.claim_seed): one another
        trial holds moves this one's seeds to a stream of its own. A queued trial (a retry, an
        enqueued point) is not checked for its parameter set."""
        storage, tid = trial.study._storage, trial._trial_id
        queued = storage.get_trial(tid).system_attrs
        seed = trial_seed(self.cfg, trial.number)
        chain = retry_chain(queued)
        if "failed_trial" in queued:
            first = stored_trial(trial.study, queued["failed_trial"])
            first_seed = None if first is None else first.user_attrs.get("seed")
            if isinstance(first_seed, int):
                seed = first_seed
        tcfgs = trial_configs(self.cfg, trial, seed)
        attrs = start_attrs("standard", tcfgs[0], trial.params, self.cfg.repeats)
        del attrs["seed"]  # stored by claim_seed, once checked
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        if not {"failed_trial", "fixed_params"} & set(queued):
            # other engines' trials: this process's own may repeat a point (its sampler's)
            mine = param_set(trial.params, trial.distributions)
            for t in trial.study.get_trials(deepcopy=False):
                if (
                    t._trial_id != tid
                    and t.user_attrs.get("worker") != WORKER
                    and t.state != TrialState.FAIL
                    and param_set(t.params, t.distributions) == mine
                ):
                    reason = f"trial #{t.number} has the same parameter set (another engine)"
                    trial.set_user_attr("failed_reason", reason)
                    trial.set_user_attr("seed", None)  # it trains nothing and holds no seed
                    raise DuplicateTrial(reason)
        moved = (trial_seed(self.cfg, trial.number + fresh_stream()) for _ in itertools.count())
        claimed = store_mod.of(storage).claim_seed(
            trial.study._study_id,
            tid,
            itertools.chain([seed], moved),
            repeats=self.cfg.repeats,
            chain=chain,
        )
        return tcfgs if claimed == seed else trial_configs(self.cfg, trial, claimed)

    def finished_elsewhere(self, study: optuna.Study) -> bool:
        """Was the last trial finished by another process? Says so on stderr."""
        if self.trial is None:
            return False
        t = study._storage.get_trial(self.trial._trial_id)
        if t.state == TrialState.RUNNING or t.user_attrs.get("worker") != WORKER:
            return False
        print(
            f"sinstudy: trial #{t.number} was marked {t.state.name} by another process while it "
            f"trained (optuna-dashboard, or a sweep); stopped, and the next trial takes its place",
            file=sys.stderr,
        )
        return True


def _is_new_best(trial: optuna.Trial, value: float) -> bool:
    """Better than every complete trial's validation MSE (the first value, with two objectives:
    the model kept is the most accurate one)."""
    study = trial.study
    if not objectives.is_multi(study):
        try:
            return value < study.best_value
        except ValueError:  # no completed trial yet
            return True
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return all(value < objectives.mse(t) for t in done)


def run_trials(
    run: Run,
    *,
    seed: int,
    on_start: Callable[[int], None] = lambda n: None,
    callbacks: list[Callable] = (),
    worker: int = 0,
    publish: bool = True,
) -> Objective:
    """Claim, run one trial, repeat, until the budget or the grid is spent or a signal arrives.
    `on_start(number)` is told each trial's number as it starts (-1 when it ends); `publish`:
    update the study note the dashboard shows once the budget is spent (not on an interrupt),
    as the batched engine's writer does."""
    cfg, store, budget = run.cfg, run.store, run.budget
    storage = store.optuna
    study = run.load_study(seed)
    objective = Objective(cfg, make_data(cfg.data, run.device), ArtifactFolder(cfg.artifact_dir))
    owner = owner_attr()

    def run_one(trial: optuna.Trial) -> float:
        on_start(trial.number)
        storage.set_trial_system_attr(trial._trial_id, OWNER_ATTR, owner)
        with store.beating(trial._trial_id, cfg.heartbeat_interval):
            return objective(trial)

    def grid_done() -> bool:
        return cfg.sampler == "grid" and grid_started(study, cfg.space)

    lost = 0  # proposals in a row that other engines had trained already
    while not interrupt.requested() and not grid_done() and budget.claim(worker=worker):
        if not store.optuna_sweeps:  # else study.optimize runs Optuna's own stale-trial sweep
            sweep_stale(store, study, grace_period=cfg.grace_period, max_retries=cfg.max_retries)
        n = objective.duplicates
        try:
            study.optimize(run_one, n_trials=1, callbacks=list(callbacks), catch=(DuplicateTrial,))
        except ValueError:  # Optuna's tell of a trial that another process finished meanwhile
            if not objective.finished_elsewhere(study):
                raise
            give_back(budget, "dropped", retries=cfg.max_retries, reserves=False, worker=worker)
            continue
        lost = lost + 1 if objective.duplicates > n else 0
        if lost:  # a FAIL that counts nothing: its claim goes back
            give_back(budget, "lost", retries=cfg.max_retries, reserves=False, worker=worker)
            study.sampler.reseed_rng()
        if lost >= MAX_LOST:
            print(EXHAUSTED, file=sys.stderr)
            break
        on_start(-1)
    if publish and not interrupt.requested():
        publish_note(study)
    return objective
