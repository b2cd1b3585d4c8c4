"""What a run shows: the progress bar while it runs and the summary at its end (one rendering)."""

from __future__ import annotations

import shlex
import signal
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from study import store
from study.config import StudyConfig
from study.store.url import dashboard_target, redact
from study.trial.course import BEST_TEST_MSE as REPORT_BEST_TEST_MSE
from study.views import analysis
from study.views.analysis import Counts, mse_texts, params_text, seeds_text
from study.views.folders import MISSING_ATTR


@dataclass
class Summary:
    study: str
    storage: str
    device: str
    this_run: Counts
    total: Counts
    wall_seconds: float
    log_dir: str
    artifact_dir: str
    best: FrozenTrial | None = None
    signum: int = 0  # the signal that interrupted the run, or 0
    bookkeeping_seconds: float | None = None  # sampler, pruner, storage, TensorBoard (one process)
    left: Leftovers | None = None  # what the run found and leaves unfinished in the study
    front: list[FrozenTrial] | None = None  # two objectives: the Pareto front, smallest first


@dataclass
class Leftovers:
    """Trials a user must know of when a run ends: those of earlier or other runs that were
    failed while it ran (and their retries), those still RUNNING (and how long since their last
    heartbeat) and those queued (WAITING)."""

    failed: dict[int, str]  # number -> why (this run's start found its process gone, ...)
    retries: dict[int, int]  # failed number -> its retry's number
    running: dict[int, float | None]  # number -> seconds since its heartbeat (None: unknown)
    running_ours: list[int]  # RUNNING trials of this run's processes (a fault: should be none)
    waiting: dict[int, int | None]  # number -> the trial it retries (None: enqueued by hand)

    @classmethod
    def of(
        cls,
        study: optuna.Study,
        trials: list[FrozenTrial],
        *,
        recovered: dict[int, str],
        running_before: set[int],
        mine,
        since: set[int] = frozenset(),
    ) -> Leftovers:
        """`since`: the trial numbers stored before the run. Recovered: what its start failed,
        others' trials RUNNING then and FAIL now, and others' trials started since that ended
        FAIL with a retry queued (a sweep's: an interrupt queues none)."""
        by_number = {t.number: t for t in trials}
        failed = dict(recovered)
        for n in sorted(running_before - set(failed)):
            if by_number[n].state == TrialState.FAIL:
                failed[n] = "failed by a sweep while this run ran"
        retried = {(t.system_attrs.get("retry_history") or [None])[-1] for t in trials}
        for t in trials:
            new = t.number not in since and t.number not in failed and not mine(t)
            if new and t.state == TrialState.FAIL and t.number in retried:
                failed[t.number] = "failed by a sweep while this run ran"
        retries = {}
        waiting = {}
        for t in trials:
            history = t.system_attrs.get("retry_history") or []
            if history and history[-1] in failed:
                retries[history[-1]] = t.number
            if t.state == TrialState.WAITING:
                waiting[t.number] = history[-1] if history else None
        running = [t for t in trials if t.state == TrialState.RUNNING]
        ages = store.of(study._storage).heartbeat_ages(running)
        return cls(
            failed=failed,
            retries=retries,
            running={t.number: ages.get(t.number) for t in running if not mine(t)},
            running_ours=[t.number for t in running if mine(t)],
            waiting=waiting,
        )

    def lines(self) -> list[str]:
        out = []
        if self.failed:
            whys = sorted(set(self.failed.values()))
            retried = [f"#{self.retries[n]}" for n in self.failed if n in self.retries]
            out.append(
                f"recovered      {_numbers(self.failed)} of other runs marked FAIL "
                f"({'; '.join(whys)})"
                + (f"; retried as {', '.join(retried)}" if retried else "; not retried")
            )
        if self.running_ours:
            out.append(f"left running   {_numbers(self.running_ours)} (this run's: a fault)")
        if self.running:
            ages = [a for a in self.running.values() if a is not None]
            beat = f", last heartbeat {max(ages):.0f} s ago at most" if ages else ""
            out.append(f"running        {_numbers(self.running)} of other runs{beat}")
        if self.waiting:
            of = [f"#{n}" for n in self.waiting.values() if n is not None]
            retries = f" (retries of {', '.join(of)})" if of else ""
            out.append(
                f"queued         {_numbers(self.waiting)}{retries}: the next run takes them"
            )
        return out


def _numbers(numbers, most: int = 8) -> str:
    ns = sorted(numbers)
    text = ", ".join(f"#{n}" for n in ns[:most])
    return text + (f" and {len(ns) - most} more" if len(ns) > most else "")


class Progress:
    """tqdm bar over this run's finished trials with the best value so far (stderr).

    Its time left is shown once `at_once` trials (those trained side by side) have finished,
    and from the mean rate since the start: before, the first trials to end (pruned early, or
    one of a batch) would predict the run at many times its length."""

    NO_ETA = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<?, {rate_fmt}{postfix}]"

    def __init__(self, total: int, enabled: bool, *, at_once: int = 1, file=None):
        from tqdm import tqdm

        self.warmup = min(total, max(1, at_once))
        self.bar = tqdm(
            total=total,
            unit="trial",
            disable=not enabled,
            dynamic_ncols=True,
            smoothing=0,
            bar_format=self.NO_ETA if self.warmup > 1 else None,
            file=file,
        )
        self.best: tuple[float, int] | None = None  # (value, number)

    def _moved(self) -> None:
        if self.bar.n >= self.warmup and self.bar.bar_format is not None:
            self.bar.bar_format = None
            self.bar.refresh()

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna callback (the standard engine in this process): one more trial finished."""
        self.bar.update(1)
        self._moved()
        if trial.state == TrialState.COMPLETE:
            self.finished(trial.number, trial.values[0])

    def written(self, number: int, state: TrialState, value: float | None) -> None:
        """The batched engine's writer stored one more finished trial."""
        self.bar.update(1)
        self._moved()
        if state == TrialState.COMPLETE:
            self.finished(number, value)

    def finished(self, number: int, value: float | None) -> None:
        if value is not None and (self.best is None or value < self.best[0]):
            self.best = (value, number)
        if self.best is not None:
            self.bar.set_postfix_str(f"best val MSE {self.best[0]:.3g} (trial {self.best[1]})")

    def to(self, n: int, study: optuna.Study) -> None:
        """Move to n finished trials (the parent of several workers polls the storage)."""
        if n != self.bar.n:
            self.bar.update(n - self.bar.n)
            self._moved()
            best = analysis.best_trial(study)
            if best is not None:
                self.finished(best.number, best.values[0])

    def close(self) -> None:
        self.bar.close()


def summarize(
    study: optuna.Study,
    cfg: StudyConfig,
    *,
    device: str,
    since: set[int],
    workers: set[str],
    wall: float,
    signum: int = 0,
    recovered: dict[int, str] | None = None,
    running_before: set[int] = frozenset(),
    run: str | None = None,
) -> Summary:
    """`since`: the trial numbers stored before the run; `workers`: its processes (the `worker`
    attr), which tells its trials from those other runs add to the study at the same time;
    `recovered`: trials of earlier runs its start failed (number -> why); `running_before`:
    others' trials RUNNING when it started; `run`: the `run` attr of its trials."""
    trials = study.get_trials(deepcopy=False)
    best = analysis.best_trial(study)

    def mine(t: FrozenTrial) -> bool:
        ua = t.user_attrs
        return (ua.get("run") == run) if run and "run" in ua else ua.get("worker") in workers

    ours = [t for t in trials if t.number not in since and mine(t)]
    return Summary(
        study=study.study_name,
        storage=redact(cfg.storage),
        device=device,
        this_run=Counts.of(ours),
        total=Counts.of(trials),
        wall_seconds=wall,
        log_dir=str(Path(cfg.log_dir) / study.study_name),
        artifact_dir=cfg.artifact_dir,
        best=best,
        front=analysis.front(study),
        signum=int(signum),
        left=Leftovers.of(
            study,
            trials,
            recovered=recovered or {},
            running_before=set(running_before),
            mine=mine,
            since=since,
        ),
    )


def shared_text(attrs: dict) -> str:
    """Its share of the device where it trained beside others (the batched engine): its
    start-to-end time then counts the others' epochs too."""
    compute, seconds = attrs.get("compute_seconds"), attrs.get("seconds")
    if compute is None or seconds is None or compute >= 0.95 * seconds:
        return ""
    return f" (its share of the device: {compute:.1f} s)"


def describe_trial(t: FrozenTrial, label: str = "best trial") -> list[str]:
    """Lines that describe a finished trial: params, value, test MSE and the key attrs."""
    ua = t.user_attrs
    val, test = mse_texts(t)
    about = [f"best epoch {ua.get('best_epoch', '?')} of {ua.get('epochs', '?')}", seeds_text(t)]
    lines = [
        f"{label:<15}#{t.number}: {params_text(t.params)}",
        f"val MSE        {val}  ({', '.join(a for a in about if a)})",
        f"test MSE       {test}  (report's best: {REPORT_BEST_TEST_MSE:.3e})",
        f"parameters     {ua.get('n_params', '?')}, trained in "
        f"{ua.get('seconds', float('nan')):.1f} s on {ua.get('device', '?')}{shared_text(ua)}",
    ]
    if "model_artifact" in ua:
        lines.append(f"model artifact {ua['model_artifact']}")
    elif MISSING_ATTR in ua:
        lines.append(f"model artifact not stored ({ua[MISSING_ATTR]})")
    return lines


FRONT_ROWS = 12  # front trials a summary lists (the rest: `sinstudy report`)


def front_lines(front: list[FrozenTrial], limit: int | None = FRONT_ROWS) -> list[str]:
    """A two-objective study's Pareto front, smallest network first: n_params, validation and
    test MSE, params. Empty for a study of one objective."""
    if not front:
        return []
    shown = front if limit is None else front[:limit]
    rows = analysis.front_rows(shown)
    width = max(len(r[1]) for r in rows)
    lines = [
        f"pareto front   {len(front)} trials (fewest parameters first; val MSE, test MSE)",
        *(f"  {r[0]:>6} {r[1]:>{width}} params  {r[2]}  {r[3]}  {r[4]}" for r in rows),
    ]
    if len(front) > len(shown):
        lines.append(f"  ... {len(front) - len(shown)} more (sinstudy report)")
    return lines


def format_summary(s: Summary) -> str:
    r, tot = s.this_run, s.total
    stopped = f"interrupted by {signal.Signals(s.signum).name}, " if s.signum else ""
    lines = [
        f"study          {s.study}  ({stopped}{s.wall_seconds:.1f} s on {s.device})",
        f"this run       {r.complete} complete, {r.pruned} pruned, {r.failed} failed",
        f"whole study    {tot.complete} complete, {tot.pruned} pruned, {tot.failed} failed",
    ]
    lines += s.left.lines() if s.left else []
    if s.best is None:
        lines.append("best trial     none complete yet")
    else:  # two objectives: a front has no one best; its most accurate trial, then the front
        lines += describe_trial(s.best, "most accurate" if s.front else "best trial")
    lines += front_lines(s.front or [])
    lines += [
        f"storage        {s.storage}",
        # quoted for a shell: a study name or folder with a space must survive the copy
        f"tensorboard    tensorboard --logdir {shlex.quote(s.log_dir)}",
        f"dashboard      optuna-dashboard {shlex.quote(dashboard_target(s.storage))} "
        f"--artifact-dir {shlex.quote(s.artifact_dir)}",
    ]
    return "\n".join(lines)
