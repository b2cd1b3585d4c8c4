"""Other engines' trials for the mirror: what is new or changed since the writer last looked.

The writer reads every `SYNC_S`; what it sends the trainer's mirror is what the sampler and the
pruner use: others' new trials (params, distributions, system attrs, the seed among user attrs)
and every change of state, a finished trial with its curve. On an RDB storage the read costs
the same however far the running trials are (Store.changes on an RDB); the journal is replayed
in memory by Optuna, so it is filtered there (all user attrs are there).
"""

from __future__ import annotations

from collections.abc import Container

from optuna.trial import FrozenTrial, TrialState

from study.store import Store

SYNC_S = 2.0  # how often other engines' trials are read from storage for the mirror
# Others' user attrs the engine reads: the weight seed (the writer refuses a seed in use). No
# sampler or pruner reads a user attr, and a trial carries a dozen (its train config).
USER_ATTRS = ("seed",)


class Changes:
    """The trials a mirror has seen: the highest trial id, and others' RUNNING / WAITING ones."""

    def __init__(self, max_id: int, unfinished: dict[int, TrialState]):
        self.max_id = max_id
        self.unfinished = dict(unfinished)

    def read(self, store: Store, study_id: int, own: Container[int]) -> list[FrozenTrial]:
        """Others' trials that are new or changed state since the last read, in id order."""
        changed = []
        for t in self._fetch(store, study_id, own):
            self.max_id = max(self.max_id, t._trial_id)
            if t._trial_id in own or self.unfinished.get(t._trial_id) == t.state:
                continue
            if t.state in (TrialState.RUNNING, TrialState.WAITING):
                self.unfinished[t._trial_id] = t.state
            else:
                self.unfinished.pop(t._trial_id, None)
            changed.append(t)
        return changed

    def _fetch(self, store: Store, study_id: int, own: Container[int]) -> list[FrozenTrial]:
        return store.changes(
            study_id, self.max_id, self.unfinished, skip=own, user_keys=USER_ATTRS
        )
