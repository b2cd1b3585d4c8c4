"""When a pruner can act, so that the batched engine asks it only then.

Successive halving (alone, or as each of Hyperband's brackets) decides only when a trial's step
reaches its next rung; the median (percentile) pruner only from its warm-up on, at its interval;
the Nop pruner never. Asked at any other epoch each returns False and writes nothing, so asking
only at these epochs (and reporting the epochs since the last ask just before) leaves every
decision as it was: tests/test_batched.py runs whole studies both ways, per pruner. A pruner
not known here is asked every epoch.

This reads Optuna's pruners' private fields (their rungs and warm-up): the version range is
pinned in pyproject.toml, and the whole-study comparison fails when a release changes them.
"""

from __future__ import annotations

import math

import optuna
from optuna.pruners import HyperbandPruner, NopPruner, PercentilePruner, SuccessiveHalvingPruner
from optuna.pruners._successive_halving import _get_current_rung
from optuna.trial import FrozenTrial

NEVER = math.inf


class EveryEpoch:
    """Ask at every epoch: for a pruner this module does not know, and as the reference."""

    def next_ask(self, study: optuna.Study, trial: FrozenTrial, epoch: int) -> float:
        return epoch + 1


class Rungs(EveryEpoch):
    """The pruner's next decision epoch for a trial that has reported up to `epoch`."""

    def __init__(self, pruner: optuna.pruners.BasePruner):
        self.pruner = pruner

    def next_ask(self, study: optuna.Study, trial: FrozenTrial, epoch: int) -> float:
        p = self.pruner
        if isinstance(p, NopPruner):
            return NEVER
        if isinstance(p, HyperbandPruner):
            if not p._pruners:
                p._try_initialization(study)  # as its first prune() would: same brackets
                if not p._pruners:  # max_resource="auto" before a trial completed
                    return epoch + 1
            return _halving(p._pruners[p._get_bracket_id(study, trial)], trial, epoch)
        if isinstance(p, SuccessiveHalvingPruner):
            return _halving(p, trial, epoch)
        if isinstance(p, PercentilePruner):  # MedianPruner is one
            return _percentile(p, epoch)
        return epoch + 1


def _halving(p: SuccessiveHalvingPruner, trial: FrozenTrial, epoch: int) -> float:
    """Its next rung's promotion step: before it prune() returns at `step < promotion`."""
    if p._min_resource is None:  # "auto": estimated from the first completed trial
        return epoch + 1
    rung = _get_current_rung(trial)  # as prune() counts it
    promotion = p._min_resource * p._reduction_factor ** (p._min_early_stopping_rate + rung)
    return max(epoch + 1, promotion)


def _percentile(p: PercentilePruner, epoch: int) -> float:
    """The first step after `epoch` that is past the warm-up and first in its interval (with a
    value every epoch, `(step - warmup) % interval == 0`)."""
    warmup, interval = p._n_warmup_steps, p._interval_steps
    step = max(epoch + 1, warmup)
    return step + (-(step - warmup)) % interval


def schedule(pruner: optuna.pruners.BasePruner) -> EveryEpoch:
    known = (HyperbandPruner, SuccessiveHalvingPruner, PercentilePruner, NopPruner)
    return Rungs(pruner) if isinstance(pruner, known) else EveryEpoch()
