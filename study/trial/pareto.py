"""Two minimised objectives: Pareto ranks, the front, its hypervolume, and pruning on them.

Optuna stores multi-objective studies but cannot prune them (`Trial.report` and `should_prune`
refuse). sinstudy's engines own their training loop, so they report each epoch straight to
storage and ask the pruners here, which keep successive halving's rungs and shares (alone, or
as each of Hyperband's brackets) and change only the order a rung ranks its trials in: by
Pareto rank on (validation MSE at the rung, n_params), ties within a rank broken by NSGA-II's
crowding distance (on log10 MSE, which spans decades), the larger first, so a rung keeps a
spread of sizes along the front rather than one corner of it. MO-ASHA (Schmucker et al., 2021,
Syne Tune) ranks the same way and breaks ties with an epsilon-net; crowding is the documented
equivalent NSGA-II uses.

Each pruner stores a trial's MSE at a rung under Optuna's own `completed_rung_<r>` key (so
study/batched/rungs.py and Optuna's `_get_current_rung` read the rungs as they do for one
objective) and reads a trial's size from its `n_params` user attr, set when it starts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import optuna
from optuna.pruners import HyperbandPruner, SuccessiveHalvingPruner
from optuna.pruners._successive_halving import _completed_rung_key, _get_current_rung
from optuna.samplers import TPESampler
from optuna.trial import FrozenTrial, TrialState

Point = tuple[float, float]  # (validation MSE, n_params): both minimised

SIZE_ATTR = "n_params"


def dominates(a: Point, b: Point) -> bool:
    return a[0] <= b[0] and a[1] <= b[1] and a != b


def ranks(points: Sequence[Point]) -> list[int]:
    """Each point's Pareto rank: 0 for the non-dominated, 1 for those only the first dominate..."""
    left = set(range(len(points)))
    out = [0] * len(points)
    rank = 0
    while left:
        front = {i for i in left if not any(dominates(points[j], points[i]) for j in left)}
        for i in front:
            out[i] = rank
        left -= front
        rank += 1
    return out


def crowding(points: Sequence[Point]) -> list[float]:
    """NSGA-II's crowding distance of each point within `points` (one rank): the ends of each
    objective get infinity, the others the normalised gap between their two neighbours."""
    n = len(points)
    out = [0.0] * n
    if n <= 2:
        return [math.inf] * n
    for m in range(2):
        order = sorted(range(n), key=lambda i: points[i][m])
        lo, hi = points[order[0]][m], points[order[-1]][m]
        out[order[0]] = out[order[-1]] = math.inf
        if hi == lo:
            continue
        for a, i, b in zip(order, order[1:], order[2:], strict=False):
            out[i] += (points[b][m] - points[a][m]) / (hi - lo)
    return out


def order(points: Sequence[Point]) -> list[int]:
    """Indices best first: by Pareto rank, then by crowding within the rank (larger first),
    then by index (stable)."""
    r = ranks(points)
    crowd = [0.0] * len(points)
    for rank in set(r):
        members = [i for i in range(len(points)) if r[i] == rank]
        for i, c in zip(members, crowding([points[i] for i in members]), strict=True):
            crowd[i] = c
    return sorted(range(len(points)), key=lambda i: (r[i], -crowd[i], i))


def front(points: Sequence[Point]) -> list[int]:
    """Indices of the non-dominated points (one of equal points), by n_params."""
    seen, out = set(), []
    for i in sorted(range(len(points)), key=lambda i: (points[i][1], points[i][0])):
        if points[i] in seen or any(dominates(points[j], points[i]) for j in range(len(points))):
            continue
        seen.add(points[i])
        out.append(i)
    return out


def hypervolume(points: Sequence[Point], reference: Point) -> float:
    """The area the points dominate up to `reference` (points beyond it count nothing)."""
    inside = sorted({p for p in points if p[0] < reference[0] and p[1] < reference[1]})
    area, top = 0.0, reference[1]
    for x, y in inside:  # by the first objective, rising: each adds the strip below its floor
        if y < top:
            area += (reference[0] - x) * (top - y)
            top = y
    return area


def trial_point(t: FrozenTrial) -> Point | None:
    """A complete trial's (val MSE, n_params), from its stored values."""
    if t.state != TrialState.COMPLETE or t.values is None or len(t.values) < 2:
        return None
    return float(t.values[0]), float(t.values[1])


def front_trials(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The complete trials on the front, smallest network first."""
    done = [(t, p) for t in trials if (p := trial_point(t)) is not None]
    return [done[i][0] for i in front([p for _, p in done])]


# ---------------------------------------------------------------- pruning


class ParetoHalving(SuccessiveHalvingPruner):
    """Successive halving whose rungs rank trials by Pareto rank on (MSE at the rung,
    n_params), crowding breaking ties; it keeps the same share as Optuna's (the best
    len // reduction_factor, at least one)."""

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        rung = _get_current_rung(trial)
        value = trial.intermediate_values[step]
        trials: list[FrozenTrial] | None = None
        size = _size(trial)
        while True:
            if self._min_resource is None:  # "auto" is not used by sinstudy, kept for Optuna's
                if trials is None:
                    trials = study.get_trials(deepcopy=False)
                self._min_resource = optuna.pruners._successive_halving._estimate_min_resource(
                    trials
                )
                if self._min_resource is None:
                    return False
            promotion = self._min_resource * (
                self._reduction_factor ** (self._min_early_stopping_rate + rung)
            )
            if step < promotion:
                return False
            if math.isnan(value):
                return True
            if trials is None:
                trials = study.get_trials(deepcopy=False)
            key = _completed_rung_key(rung)
            study._storage.set_trial_system_attr(trial._trial_id, key, value)
            competing = [
                (t.system_attrs[key], _size(t))
                for t in trials
                if key in t.system_attrs and t._trial_id != trial._trial_id
            ]
            # log10 of the MSE: it spans decades, and crowding measures gaps along each axis
            points = [(_log(value), size)] + [(_log(v), n) for v, n in competing]
            # the trial itself first: ties keep it
            if len(points) <= self._bootstrap_count:
                return True
            keep = max(1, len(points) // self._reduction_factor)
            if 0 not in order(points)[:keep]:
                return True
            rung += 1


def _log(mse: float) -> float:
    return math.log10(max(mse, 1e-300))


def _size(t: FrozenTrial) -> float:
    n = t.user_attrs.get(SIZE_ATTR)
    return float(n) if isinstance(n, (int, float)) else math.inf


class ParetoHyperband(HyperbandPruner):
    """Hyperband whose brackets are ParetoHalving pruners (the same brackets, rungs and
    shares as Optuna's HyperbandPruner)."""

    def _try_initialization(self, study: optuna.Study) -> None:
        super()._try_initialization(study)
        self._pruners = [
            ParetoHalving(
                min_resource=p._min_resource,
                reduction_factor=p._reduction_factor,
                min_early_stopping_rate=p._min_early_stopping_rate,
                bootstrap_count=p._bootstrap_count,
            )
            for p in self._pruners
        ]


# ---------------------------------------------------------------- sampling


class ParetoTPESampler(TPESampler):
    """Optuna's TPE for a study of two objectives whose pruned trials have curves.

    TPE ranks pruned trials by (last step, last intermediate value) in the study's direction,
    which a study of two objectives cannot name (Optuna's TPE assumes such a study is never
    pruned). Here the intermediate values are the first objective's (the validation MSE), so
    TPE is handed the study with that objective's direction; the complete trials are still
    split by their Pareto ranks on both values. This overrides TPE's private `_sample`: the
    version range is pinned, and tests/test_pareto.py fails when a release changes it."""

    def _sample(self, study, trial, search_space):
        return super()._sample(_FirstDirection(study), trial, search_space)


class _FirstDirection:
    """The study as it is, but `direction` is its first objective's."""

    def __init__(self, study: optuna.Study):
        self._wrapped = study

    @property
    def direction(self):
        return self._wrapped.directions[0]

    def __getattr__(self, name: str):
        return getattr(self._wrapped, name)
