r"""A trial's life in one run as one state machine: the budget, seed and retry rules are its edges.

  asked -hand over-> starting -started-> running -ended-> finishing -written-> stored
                      |  |                  |               |   \-dropped-> dropped
                      |  |                  |               \-confirmed (a start seen late)
                      |  |                  \-failed / orphaned-> failed -> retried (in storage)
                      |  \-seed held-> requeued (left WAITING: asked again, its own seeds)
                      \-lost / unconfirmed-> lost

A trial is `asked` once the run's budget gave it a claim (Budget.claim). Each edge then says what
happens to that claim (`Claim`): kept (the trial counts), given back (a new trial takes its
place), or given back and reserved for a queued retry, which only a queued trial may take. The
batched engine's trainer (`Ledger`), its writer process (`give_back`) and the standard engine
(`give_back`, with `reserves=False`) apply the same table, TRANSITIONS. A trial may end before
its start is confirmed (pruned at its first epoch): `confirmed` then only records it.

The seed rule: a trial's weight seeds are its own (counted from its engine's stream), unless it
retries a failed trial, whose seeds it reuses so that the retry trains what the failed trial
trained; a queued trial the writer left WAITING because another trial holds those seeds is
asked again with its own (`requeued`). A proposal another engine already has moves the engine's
stream (`lost` with a collision). The retry rule: a FAIL whose process died or that was failed
from outside queues a retry while retries remain (study.store.recovery.fail_and_retry); its
claim is kept for that retry, which any worker of the run may start past its share.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol


class Phase(Enum):
    ASKED = "asked"  # proposed, its budget claim taken
    STARTING = "starting"  # handed to the writer, its start not confirmed yet
    RUNNING = "running"  # stored RUNNING, training
    FINISHING = "finishing"  # ended in training, its end handed to the writer
    STORED = "stored"  # its end is stored: it counts
    DROPPED = "dropped"  # another process ended it first; its end is not stored
    LOST = "lost"  # never stored: another engine has its parameter set or seeds, or took it
    REQUEUED = "requeued"  # a queued trial left WAITING (its seeds are held): asked again
    FAILED = "failed"  # failed from outside while it trained, or its process died


class Claim(Enum):
    """What an edge does with the trial's budget claim."""

    KEEP = "kept"
    RETURN = "given back"
    RESERVE = "given back, reserved for a queued trial"
    RESERVE_IF_RETRIES = "given back, reserved for its retry while retries remain"


@dataclass(frozen=True)
class Transition:
    sources: frozenset[Phase]
    to: Phase
    claim: Claim


P = Phase
TRANSITIONS: dict[str, Transition] = {
    "hand_over": Transition(frozenset({P.ASKED}), P.STARTING, Claim.KEEP),
    "started": Transition(frozenset({P.STARTING}), P.RUNNING, Claim.KEEP),
    # its start confirmed after it had ended (pruned at its first epoch)
    "confirmed": Transition(frozenset({P.FINISHING}), P.FINISHING, Claim.KEEP),
    "lost": Transition(frozenset({P.STARTING, P.FINISHING}), P.LOST, Claim.RETURN),
    "seed_held": Transition(frozenset({P.STARTING, P.FINISHING}), P.REQUEUED, Claim.RESERVE),
    "ended": Transition(frozenset({P.STARTING, P.RUNNING}), P.FINISHING, Claim.KEEP),
    "written": Transition(frozenset({P.FINISHING}), P.STORED, Claim.KEEP),
    # another process ended it first (a sweep that took it for dead queues its retry)
    "dropped": Transition(frozenset({P.FINISHING}), P.DROPPED, Claim.RESERVE_IF_RETRIES),
    # failed from outside while it trained (a sweep, optuna-dashboard's "Fail trial")
    "failed": Transition(frozenset({P.RUNNING, P.FINISHING}), P.FAILED, Claim.RESERVE_IF_RETRIES),
    # its trainer or writer died: failed here, its retry queued
    "orphaned": Transition(
        frozenset({P.RUNNING, P.FINISHING}), P.FAILED, Claim.RESERVE_IF_RETRIES
    ),
    # its trainer or writer died before its start was confirmed (a sweep recovers it if stored)
    "unconfirmed": Transition(frozenset({P.STARTING, P.FINISHING}), P.LOST, Claim.RETURN),
}


class GivesBack(Protocol):
    def give_back(self, n: int = 1, *, for_queued: bool = False, **where: int) -> None: ...


def give_back(
    target: GivesBack,
    event: str,
    n: int = 1,
    *,
    retries: int,
    reserves: bool = True,
    **where: int,
) -> None:
    """Apply edge `event`'s claim rule to `n` trials' claims held by `target` (the run's Budget,
    with `where` its worker; the writer's Claims). `reserves` False: an engine that cannot
    honour a reservation (the standard engine, whose Optuna ask takes a queued trial first
    whatever the budget says)."""
    rule = TRANSITIONS[event].claim
    if rule is Claim.KEEP or n <= 0:
        return
    reserve = rule is Claim.RESERVE or (rule is Claim.RESERVE_IF_RETRIES and retries > 0)
    target.give_back(n, for_queued=reserves and reserve, **where)


class IllegalTransition(RuntimeError):
    """An edge the table does not have: an engine's bookkeeping is wrong."""


@dataclass
class Entry:
    phase: Phase
    first_seed: int | None = None  # its first weight seed, recorded in the mirror once stored
    queued: Any = None  # the stored WAITING trial it took, if any (its `trial_id`)
    trial: Any = None  # what the engine asks again if the trial is requeued
    number: int | None = None  # its stored number, once started
    value: float = float("inf")  # its value as handed over (COMPLETE), for the best stored
    confirmed: bool = False  # the writer confirmed its start


@dataclass
class Ledger:
    """The batched trainer's trials by handle, each in its phase. `retries`: the run's
    max_retries; `stored_best`: the best value confirmed stored (this engine's and those it was
    loaded with)."""

    retries: int
    stored_best: float = float("inf")
    entries: dict[int, Entry] = field(default_factory=dict)
    collisions: int = 0  # proposals lost to other engines since the last one stored
    own_seeds: set[int] = field(default_factory=set)  # queued trials that train their own seeds
    syncs: int = 0  # the writer's syncs seen
    retry_wait: tuple[int, float] | None = None  # (sync count, time) a retry is waited until

    def _move(self, handle: int, event: str) -> Entry:
        edge = TRANSITIONS[event]
        entry = self.entries.get(handle)
        if entry is None or entry.phase not in edge.sources:
            now = None if entry is None else entry.phase.value
            raise IllegalTransition(f"trial handle {handle}: {event} from {now}")
        entry.phase = edge.to
        return entry

    def _close(self, handle: int) -> None:
        """A trial whose life here is over leaves the ledger."""
        self.entries.pop(handle, None)

    # ------------------------------------------------------------------ edges

    def hand_over(
        self, handle: int, first_seed: int, queued: Any = None, trial: Any = None
    ) -> None:
        """asked -> starting: its claim taken (Budget.claim) and its start handed to the writer."""
        self.entries[handle] = Entry(Phase.ASKED, first_seed, queued, trial)
        self._move(handle, "hand_over")

    def started(self, handle: int, number: int) -> int | None:
        """The writer stored its start: returns its first seed, which the mirror records under
        the stored number (a retry of it reuses it). A trial that ended meanwhile stays
        finishing."""
        entry = self.entries[handle]
        self._move(handle, "confirmed" if entry.phase is Phase.FINISHING else "started")
        entry.confirmed, entry.number = True, number
        self.collisions = 0
        seed, entry.first_seed = entry.first_seed, None
        return seed

    def lost(self, handle: int, *, collided: bool, waiting: bool) -> Entry:
        """The writer could not store it (and gave its claim back): another engine has its
        parameter set or seeds or took the queued trial first (`lost`), or (`waiting`) another
        trial holds the queued trial's seeds, which stays WAITING (`seed_held`): asked again,
        it trains its own seeds."""
        entry = self._move(handle, "seed_held" if waiting else "lost")
        if waiting and entry.queued is not None:
            self.own_seeds.add(entry.queued.trial_id)
        if collided:
            self.collisions += 1
        self._close(handle)
        return entry

    def ended(self, handle: int, value: float) -> None:
        """Training ended (its state and value handed to the writer); `value`: the COMPLETE
        trial's, else inf."""
        self._move(handle, "ended").value = value

    def written(self, handle: int) -> None:
        entry = self._move(handle, "written")
        self.stored_best = min(self.stored_best, entry.value)
        self._close(handle)

    def dropped(self, handle: int) -> None:
        """Its end was not stored: another process ended it first (the writer gave its claim
        back), or its start had been lost already."""
        entry = self.entries.get(handle)
        if entry is not None and entry.phase is Phase.FINISHING:
            self._move(handle, "dropped")
        self._close(handle)

    def failed(self, handle: int) -> None:
        """Failed from outside while it trained (the writer gave its claim back)."""
        self._move(handle, "failed")
        self._close(handle)

    def settle(self, fail: Callable[[int], bool], budget: GivesBack, **where: int) -> None:
        """The writer died: each stored trial still held is failed and retried (`fail(number)`:
        True when it was failed here or by another process meanwhile) and its claim kept for
        the retry; the claims of trials whose start was never confirmed go back."""
        for handle, entry in list(self.entries.items()):
            if not entry.confirmed:
                self._move(handle, "unconfirmed")
                give_back(budget, "unconfirmed", retries=self.retries, **where)
            elif fail(entry.number):
                self._move(handle, "orphaned")
                give_back(budget, "orphaned", retries=self.retries, **where)
            self._close(handle)

    # ------------------------------------------------------------------ questions

    @property
    def pending(self) -> set[int]:
        """Handles whose start the writer has not confirmed."""
        return {h for h, e in self.entries.items() if not e.confirmed}

    @property
    def finishing(self) -> set[int]:
        return {h for h, e in self.entries.items() if e.phase is Phase.FINISHING}

    def unsettled(self) -> bool:
        """Starts or ends the writer has not confirmed yet."""
        return any(not e.confirmed or e.phase is Phase.FINISHING for e in self.entries.values())

    def first_seed(self, own: int, queued: int | None, retried_seed: int | None) -> int:
        """The seed rule: a trial trains its engine's count (`own`), unless it is a queued
        retry of a trial with seed `retried_seed` and not one the writer requeued."""
        if queued is None or queued in self.own_seeds or retried_seed is None:
            return own
        return retried_seed

    def awaiting_retry(self, reserved: int, unreserve: Callable[[], None], sync_s: float) -> bool:
        """A claim is reserved for a queued retry (`reserved`): worth a few syncs' wait
        (RETRY_SYNCS of the writer's syncs and as many SYNC_S), not forever: another run on the
        study may take the retry, or none was queued (optuna-dashboard's "Fail trial" queues
        none). Counted in syncs, not only seconds: a loaded machine slows the syncs, and a retry
        the mirror had not been shown yet would be left WAITING. Then the claims are free
        again (`unreserve`), for new trials."""
        if not reserved:
            self.retry_wait = None
            return False
        if self.retry_wait is None:
            self.retry_wait = (self.syncs + RETRY_SYNCS, time.monotonic() + RETRY_SYNCS * sync_s)
        syncs, until = self.retry_wait
        if self.syncs >= syncs and time.monotonic() >= until:
            unreserve()
            self.retry_wait = None
        return True


# A sweep marks a trial FAIL, then queues its retry: the writer's sync that sees the one may
# miss the other, so a retry is waited for over a few syncs.
RETRY_SYNCS = 3
