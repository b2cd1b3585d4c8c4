"""Parameter importances with their uncertainty: an interval per parameter and evaluator, how
often each parameter ranks first, and whether the two evaluators agree.

The rules, stated once:

- The point value is Optuna's importance on all complete trials (normalised, sum 1).
- The interval is the 2.5th-97.5th percentile over `resamples` bootstrap resamples of the complete
  trials (drawn with replacement); fANOVA's forest seed changes with each resample, so its own
  randomness is part of the interval.
- A parameter is *first* in a resample when its importance there is the largest; `first` is the
  share of resamples in which it is. A ranking is *stable* when its leader is first in at least
  STABLE of them; where it is not, the leader's share is measured again on half the trials, so
  the views can say how the answer moves with more trials (measured, not extrapolated).
- The evaluators *disagree* on a parameter when their intervals do not overlap; the views then
  say so instead of printing two numbers side by side.
- An objective that is a function of some parameters alone is computed on those alone: a
  network's parameter count (`n_params`) depends on its depth and widths, and any importance
  the other parameters got would be the evaluator's artefact. They are reported as 0, marked.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from study import quiet
from study.views import analysis

RESAMPLES = 20  # enough for a 95% interval's shape at a cost the views can pay on every call
NOTE_RESAMPLES = 10  # the dashboard's note, written at the end of every run, which waits for it
NOTE_MAX_TRIALS = 50  # beyond, the note's resampling would cost each run's end seconds: none
STABLE = 0.9  # a leader first in at least this share of resamples is a stable ranking
TIE = 1e-9  # importances closer than this are equal
NAMES = {"ped-anova": "PED-ANOVA", "fanova": "fANOVA"}


def structural_params(objective: str, params: Iterable[str]) -> list[str] | None:
    """The parameters `objective` is a function of by construction, or None when it depends on
    training (the validation MSE)."""
    if objective != "n_params":
        return None
    return [p for p in params if p == "depth" or p.startswith("width")]


@dataclass(frozen=True)
class Interval:
    param: str
    value: float  # on all complete trials
    low: float  # 2.5th percentile over the resamples
    high: float  # 97.5th
    first: float  # share of resamples where it ranks first
    structural: bool = False  # 0 by construction: the objective does not depend on it

    def text(self, interval: bool = True) -> str:
        if self.structural:
            return "0 (by construction)"
        if not interval:
            return f"{self.value:.2f}"
        return f"{self.value:.2f} [{self.low:.2f}, {self.high:.2f}]"


@dataclass(frozen=True)
class Evaluated:
    """One evaluator's importances for one objective, largest first."""

    evaluator: str
    rows: list[Interval]
    half_first: float | None = None  # the leader's `first` on half the trials (unstable only)

    @property
    def leader(self) -> Interval:
        return self.rows[0]

    @property
    def stable(self) -> bool:
        return self.leader.first >= STABLE

    def of(self, param: str) -> Interval | None:
        return next((r for r in self.rows if r.param == param), None)


@dataclass(frozen=True)
class Importances:
    """What `sinstudy importance` prints for one objective, and the views show."""

    study: str
    objective: str
    trials: int
    resamples: int
    evaluated: list[Evaluated]
    structural: list[str] | None = None  # the parameters the objective is a function of
    params: list[str] = field(default_factory=list)  # ordered by the first evaluator's value

    def disagreements(self) -> list[str]:
        """Parameters on which two evaluators' intervals do not overlap."""
        if len(self.evaluated) < 2:
            return []
        a, b = self.evaluated[:2]
        out = []
        for p in self.params:
            x, y = a.of(p), b.of(p)
            if x and y and not x.structural and (x.high < y.low or y.high < x.low):
                out.append(p)
        return out

    def to_json(self) -> dict:
        d = asdict(self)
        d["disagree"] = self.disagreements()
        d["stable"] = {e.evaluator: e.stable for e in self.evaluated}
        return d


def evaluate(
    study: optuna.Study,
    evaluators: tuple[str, ...] = analysis.EVALUATORS,
    *,
    objective: int = 0,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Importances:
    """Importances with intervals for one of the study's objectives (the module's rules). The
    study needs analysis.MIN_TRIALS_FOR_IMPORTANCE complete trials (importance_shortfall).
    `resamples` 0: the values alone (no interval, no ranking's stability)."""
    trials = analysis.complete_trials(study)
    name = analysis.objective_names(study)[objective]
    every = sorted({p for t in trials for p in t.params})
    only = structural_params(name, every)
    evaluated = []
    for ev in evaluators:
        rows = _intervals(study, trials, ev, objective, resamples, seed, only)
        zero = [Interval(p, 0.0, 0.0, 0.0, 0.0, True) for p in every if only and p not in only]
        result = Evaluated(ev, rows + zero)
        if resamples and not result.stable:
            half = _firsts(study, trials, ev, objective, resamples, seed, only, len(trials) // 2)
            result = Evaluated(ev, result.rows, half.get(result.leader.param, 0.0))
        evaluated.append(result)
    params = [r.param for r in evaluated[0].rows]
    return Importances(study.study_name, name, len(trials), resamples, evaluated, only, params)


def _intervals(study, trials, ev, objective, resamples, seed, only) -> list[Interval]:
    point = _importance(study, trials, ev, objective, seed, only)
    draws = _draws(study, trials, ev, objective, resamples, seed, only, len(trials))
    firsts = _first_shares(draws)
    rows = []
    for p, v in point.items():
        got = np.array([d.get(p, 0.0) for d in draws] or [v])
        low, high = np.percentile(got, [2.5, 97.5])
        rows.append(Interval(p, v, float(low), float(high), firsts.get(p, 0.0)))
    return sorted(rows, key=lambda r: -r.value)


def _firsts(study, trials, ev, objective, resamples, seed, only, size) -> dict[str, float]:
    return _first_shares(_draws(study, trials, ev, objective, resamples, seed, only, size))


def _first_shares(draws: list[dict[str, float]]) -> dict[str, float]:
    """Each parameter's share of the draws it leads; a draw whose top is a tie (an evaluator
    that found nothing to tell the parameters apart) is led by none."""
    leaders = []
    for d in draws:
        top = sorted(d.values(), reverse=True)[:2]
        if top and (len(top) == 1 or top[0] > top[1] + TIE):
            leaders.append(max(d, key=d.get))
    return {p: leaders.count(p) / len(draws) for p in set(leaders)}


def _draws(study, trials, ev, objective, resamples, seed, only, size) -> list[dict[str, float]]:
    rng = random.Random(seed)
    out = []
    for b in range(resamples):
        picked = [trials[rng.randrange(len(trials))] for _ in range(size)]
        if len({_key(t) for t in picked}) < 2:  # one distinct trial: nothing to attribute
            continue
        out.append(_importance(study, picked, ev, objective, seed + 1 + b, only))
    return out


def _key(t: FrozenTrial) -> tuple:
    return tuple(sorted(t.params.items()))


def _importance(study, trials, ev, objective, seed, only) -> dict[str, float]:
    """Optuna's normalised importances on `trials`, for the study's objective `objective`."""
    with quiet.importances():
        copy = optuna.create_study(directions=study.directions)
        if study.metric_names:
            copy.set_metric_names(study.metric_names)
        copy.add_trials(trials)
        kw = analysis.target(copy, objective)
        kw.pop("target_name", None)
        return optuna.importance.get_param_importances(
            copy, evaluator=analysis.make_evaluator(ev, seed), params=only, normalize=True, **kw
        )


# ---------------------------------------------------------------- text


def evidence_line(study: optuna.Study) -> str | None:
    """What the views' importances rest on, where a study also has pruned trials."""
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    if not pruned:
        return None
    return (
        f"on the complete trials, which trained the full budget; `sinstudy importance` adds "
        f"the {len(pruned)} pruned ones at each budget they reached"
    )


def lines(imp: Importances) -> list[str]:
    """The table, the ranking, the agreement and the stability, as `sinstudy importance` prints
    them."""
    names = [NAMES[e.evaluator] for e in imp.evaluated]
    width = max(len(p) for p in imp.params + ["parameter"]) + 2
    how = (
        f"{imp.resamples} bootstrap resamples, 95% intervals"
        if imp.resamples
        else "values alone (intervals: sinstudy importance)"
    )
    out = [
        f"importance of {imp.objective} in study {imp.study!r}: {imp.trials} complete trials, "
        f"{how}",
        "parameter".ljust(width) + "".join(n.ljust(24) for n in names).rstrip(),
    ]
    for p in imp.params:
        cells = [
            (e.of(p).text(bool(imp.resamples)) if e.of(p) else "-").ljust(24)
            for e in imp.evaluated
        ]
        out.append((p.ljust(width) + "".join(cells)).rstrip())
    if not imp.resamples:
        return out + _structural_lines(imp)
    out.append(
        "ranking   "
        + "; ".join(
            f"{NAMES[e.evaluator]}: {e.leader.param} first in {e.leader.first:.0%} of resamples"
            for e in imp.evaluated
        )
    )
    out += _structural_lines(imp)
    if len(imp.evaluated) > 1:
        off = imp.disagreements()
        if off:
            a, b = imp.evaluated[:2]
            said = "; ".join(
                f"{p}: {NAMES[a.evaluator]} {a.of(p).low:.2f}-{a.of(p).high:.2f}, "
                f"{NAMES[b.evaluator]} {b.of(p).low:.2f}-{b.of(p).high:.2f}"
                for p in off
            )
            out.append(f"agreement the evaluators disagree ({said}): neither alone is the answer")
        else:
            out.append("agreement the evaluators agree: every parameter's intervals overlap")
    for e in imp.evaluated:
        if not e.stable:
            out.append(
                f"stability {NAMES[e.evaluator]}'s ranking is not yet stable: {e.leader.param} "
                f"first in {e.leader.first:.0%} of resamples of {imp.trials} trials, "
                f"{e.half_first:.0%} of {imp.trials // 2}; more trials would help"
            )
    return out


# ---------------------------------------------------------------- fidelities

FIDELITY_STEPS = 3  # fidelities below the full one: max_epochs / 3**k for k = 1..this


@dataclass(frozen=True)
class Fidelity:
    """Importances of the validation MSE at one epoch: every trial that trained that far,
    complete or pruned, valued by its best validation MSE up to that epoch."""

    epoch: int
    complete: bool  # the full budget: the complete trials and their values
    found: Importances


def fidelities(
    study: optuna.Study,
    evaluators: tuple[str, ...] = analysis.EVALUATORS,
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> list[Fidelity]:
    """The validation MSE's importances at max_epochs / 3**k epochs (k = FIDELITY_STEPS .. 1)
    wherever at least analysis.MIN_TRIALS_FOR_IMPORTANCE trials reached them, then on the
    complete trials: whether the ranking holds from the first rung to the last, with the
    pruned trials' epochs counted."""
    trained = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        if t.intermediate_values
    ]
    full = _max_epochs(study, trained)
    out = []
    for k in range(FIDELITY_STEPS, 0, -1):
        epoch = round(full / 3**k)
        if epoch < 1 or (out and epoch <= out[-1].epoch):
            continue
        reached = [_at(t, epoch) for t in trained if max(t.intermediate_values) >= epoch]
        if len(reached) >= analysis.MIN_TRIALS_FOR_IMPORTANCE:
            with quiet.importances():
                copy = optuna.create_study(study_name=study.study_name)
                copy.add_trials(reached)
            out.append(Fidelity(epoch, False, evaluate(copy, evaluators, resamples=resamples)))
    if len(analysis.complete_trials(study)) >= analysis.MIN_TRIALS_FOR_IMPORTANCE:
        found = evaluate(study, evaluators, resamples=resamples, seed=seed)
        out.append(Fidelity(full, True, found))
    return out


def _max_epochs(study: optuna.Study, trained: list[FrozenTrial]) -> int:
    cfg = json.loads(study.user_attrs.get("config", "{}"))
    stored = cfg.get("train", {}).get("max_epochs")
    return int(stored) if stored else max((max(t.intermediate_values) for t in trained), default=1)


def _at(t: FrozenTrial, epoch: int) -> FrozenTrial:
    """The trial as if it had ended at `epoch`: its best validation MSE so far as its value."""
    return optuna.trial.create_trial(
        params=t.params,
        distributions=t.distributions,
        value=min(v for s, v in t.intermediate_values.items() if s <= epoch),
    )


def _structural_lines(imp: Importances) -> list[str]:
    if imp.structural is None:
        return []
    return [
        f"note      {imp.objective} is a function of {', '.join(imp.structural)} alone: the "
        f"other parameters are 0 by construction"
    ]


def fidelity_lines(found: list[Fidelity]) -> list[str]:
    """One line per fidelity (its leader and share per evaluator), then whether the leader
    holds across them."""
    out = [
        "by fidelity (best val MSE up to the epoch, every trial that trained that far, "
        "pruned ones too):"
    ]
    for f in found:
        kind = "complete trials" if f.complete else "trials"
        leads = "; ".join(
            f"{NAMES[e.evaluator]}: {e.leader.param} first in {e.leader.first:.0%}"
            for e in f.found.evaluated
        )
        out.append(f"  epoch {f.epoch:>5}, {f.found.trials:>4} {kind:<15} {leads}")
    leaders = {e.leader.param for f in found for e in f.found.evaluated}
    if len(found) > 1 and len(leaders) == 1:
        out.append(f"  the leader, {leaders.pop()}, holds from epoch {found[0].epoch} to the last")
    elif len(found) > 1:
        out.append(
            f"  the leader changes with the budget ({', '.join(sorted(leaders))}): the ranking "
            f"at one budget is not the ranking at another"
        )
    return out
