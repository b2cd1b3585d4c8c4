"""The trial ledger (study.run.ledger): one test per edge of a trial's life, no processes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from study.run.budget import Budget
from study.run.ledger import (
    TRANSITIONS,
    Claim,
    IllegalTransition,
    Ledger,
    Phase,
    give_back,
)


class Given:
    """A budget stand-in that records what is given back."""

    def __init__(self):
        self.calls: list[tuple[int, bool, dict]] = []

    def give_back(self, n: int = 1, *, for_queued: bool = False, **where) -> None:
        self.calls.append((n, for_queued, where))


def _queued(trial_id: int) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id)


def test_every_phase_is_reached_and_every_edge_states_its_claim():
    reached = {t.to for t in TRANSITIONS.values()} | {Phase.ASKED}
    assert reached == set(Phase)
    assert all(isinstance(t.claim, Claim) for t in TRANSITIONS.values())


def test_hand_over_takes_an_asked_trial_to_starting():
    ledger = Ledger(retries=1)
    ledger.hand_over(7, first_seed=42)
    assert ledger.entries[7].phase is Phase.STARTING
    assert ledger.pending == {7} and ledger.unsettled()


def test_started_confirms_it_returns_its_seed_once_and_ends_a_run_of_collisions():
    ledger = Ledger(retries=1)
    ledger.hand_over(1, first_seed=5)
    ledger.hand_over(2, first_seed=6)
    ledger.lost(2, collided=True, waiting=False)
    assert ledger.collisions == 1
    assert ledger.started(1, number=30) == 5
    assert ledger.entries[1].phase is Phase.RUNNING and ledger.entries[1].number == 30
    assert ledger.collisions == 0 and ledger.pending == set()
    assert not ledger.unsettled()  # running: nothing for the writer to confirm


def test_a_trial_that_ends_before_its_start_is_confirmed_stays_finishing():
    ledger = Ledger(retries=1)
    ledger.hand_over(1, first_seed=5)
    ledger.ended(1, value=0.5)
    assert ledger.started(1, number=3) == 5
    assert ledger.entries[1].phase is Phase.FINISHING and ledger.unsettled()
    ledger.written(1)
    assert ledger.stored_best == 0.5 and not ledger.entries


def test_lost_gives_the_claim_back_and_a_collision_counts():
    ledger, given = Ledger(retries=1), Given()
    ledger.hand_over(1, first_seed=5)
    entry = ledger.lost(1, collided=True, waiting=False)
    assert entry.phase is Phase.LOST and ledger.collisions == 1 and not ledger.entries
    give_back(given, "lost", retries=1)
    assert given.calls == [(1, False, {})]


def test_seed_held_requeues_it_reserves_its_claim_and_its_next_ask_trains_its_own_seeds():
    ledger, given = Ledger(retries=1), Given()
    ledger.hand_over(1, first_seed=5, queued=_queued(99), trial="trial")
    entry = ledger.lost(1, collided=False, waiting=True)
    assert entry.phase is Phase.REQUEUED and entry.trial == "trial"
    give_back(given, "seed_held", retries=0)
    assert given.calls == [(1, True, {})]  # reserved whatever the retries
    # the seed rule: a queued retry reuses the failed trial's seed, unless it was requeued
    assert ledger.first_seed(own=10, queued=99, retried_seed=5) == 10
    assert ledger.first_seed(own=10, queued=98, retried_seed=5) == 5
    assert ledger.first_seed(own=10, queued=98, retried_seed=None) == 10  # an enqueued point
    assert ledger.first_seed(own=10, queued=None, retried_seed=5) == 10


def test_ended_then_written_keeps_the_claim_and_the_best_stored():
    ledger = Ledger(retries=1, stored_best=0.3)
    for handle, value in ((1, 0.5), (2, 0.2)):
        ledger.hand_over(handle, first_seed=handle)
        ledger.started(handle, number=handle)
        ledger.ended(handle, value)
        ledger.written(handle)
    assert ledger.stored_best == 0.2 and not ledger.entries
    assert TRANSITIONS["written"].claim is Claim.KEEP


@pytest.mark.parametrize("retries, reserved", [(1, True), (0, False)])
def test_dropped_and_failed_reserve_their_claims_for_retries_while_retries_remain(
    retries, reserved
):
    ledger, given = Ledger(retries=retries), Given()
    for handle in (1, 2):
        ledger.hand_over(handle, first_seed=handle)
        ledger.started(handle, number=handle)
    ledger.ended(1, 0.5)
    ledger.dropped(1)  # another process ended it first
    ledger.failed(2)  # failed from outside while it trained
    assert not ledger.entries
    for event in ("dropped", "failed"):
        give_back(given, event, retries=retries)
    assert given.calls == [(1, reserved, {}), (1, reserved, {})]


def test_the_standard_engine_never_reserves():
    given = Given()
    for event in ("dropped", "orphaned", "seed_held", "lost"):
        give_back(given, event, retries=2, reserves=False, worker=3)
    assert given.calls == [(1, False, {"worker": 3})] * 4


def test_settle_fails_the_confirmed_and_gives_back_the_unconfirmed():
    ledger = Ledger(retries=1)
    budget = Budget(4, None)
    assert all(budget.claim() for _ in range(4))
    for handle in (1, 2, 3):
        ledger.hand_over(handle, first_seed=handle)
    ledger.started(1, number=11)
    ledger.started(2, number=12)
    failed = []
    # trial 12 had finished meanwhile (nothing to fail): its claim stays with it
    ledger.settle(lambda n: failed.append(n) or n == 11, budget, worker=0)
    assert sorted(failed) == [11, 12] and not ledger.entries
    assert budget.reserved() == 1  # trial 11's retry
    assert budget.claim(queued=True)  # the retry
    assert budget.claim()  # trial 3, never confirmed: its claim went back
    assert not budget.claim()


def test_an_edge_the_table_lacks_is_refused():
    ledger = Ledger(retries=1)
    ledger.hand_over(1, first_seed=1)
    with pytest.raises(IllegalTransition, match="written from starting"):
        ledger.written(1)
    with pytest.raises(IllegalTransition, match="failed from None"):
        ledger.failed(2)


def test_a_reserved_claim_is_waited_for_over_syncs_and_time_then_freed(monkeypatch):
    import study.run.ledger as ledger_mod

    clock = [100.0]
    monkeypatch.setattr(ledger_mod.time, "monotonic", lambda: clock[0])
    ledger, freed = Ledger(retries=1), []
    assert not ledger.awaiting_retry(0, lambda: freed.append(1), sync_s=2.0)
    assert ledger.awaiting_retry(1, lambda: freed.append(1), sync_s=2.0)
    ledger.syncs += ledger_mod.RETRY_SYNCS  # the syncs came, the time not yet
    assert ledger.awaiting_retry(1, lambda: freed.append(1), sync_s=2.0) and not freed
    clock[0] += ledger_mod.RETRY_SYNCS * 2.0
    assert ledger.awaiting_retry(1, lambda: freed.append(1), sync_s=2.0) and freed == [1]
