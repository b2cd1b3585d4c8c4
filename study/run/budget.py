"""The trial budget of one run, shared by its local workers: exact across them, and split.

Every engine claims each trial from the `Budget` before it starts it, so N workers never start
more than --n-trials trials between them; a claim whose trial was not stored (another engine
took its parameter set first, another engine failed it while it trained) or whose trainer died
is given back, and its retry or a new trial takes its place. Each worker starts at most its share
of the new trials (ceil(n_trials / workers)): the first worker up would otherwise take a budget
smaller than its slots whole while the others were still starting. Once a worker has ended, the
others may start past their shares: a claim one worker reserved for a retry and another took,
then gave back (another run took the retry first), belongs to no live worker's share, and
would otherwise be stranded.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import time

_CTX = mp.get_context("spawn")  # fork after torch/SQLAlchemy have threads is unsafe


class Budget:
    """Trials this run may still start. A claim given back for a crashed trial whose retry was
    queued is `reserved` for a queued trial: a worker about to start a new trial cannot take it
    before the retry is seen."""

    def __init__(self, n_trials: int, timeout: float | None, *, workers: int = 1):
        self.n_trials = n_trials
        self.deadline = None if timeout is None else time.time() + timeout
        self.share = math.ceil(n_trials / workers)  # new trials one worker may start
        self._claimed = _CTX.Value("i", 0)
        self._reserved = _CTX.Value("i", 0)
        self._stopped = _CTX.Value("b", 0)
        self._by = _CTX.Array("i", [0] * workers)  # claims of each worker
        self._ended = _CTX.Value("i", 0)  # workers whose engines ran to their ends

    def claim(self, *, queued: bool = False, worker: int = 0) -> bool:
        """One trial may start in `worker`; `queued`: it is a queued trial (a retry, an enqueued
        trial). A retry whose claim is reserved may start in any worker, past its share."""
        with self._claimed.get_lock():
            if self._stopped.value:
                return False
            if not (queued and self._reserved.value > 0):
                if self._claimed.value + self._reserved.value >= self.n_trials:
                    return False
                if self._by[worker] >= self.share and not self._ended.value:
                    return False
                if self.deadline is not None and time.time() >= self.deadline:
                    return False
            else:
                self._reserved.value -= 1
            self._claimed.value += 1
            self._by[worker] += 1
            return True

    def release(self, n: int = 1, *, for_queued: bool = False, worker: int = 0) -> None:
        """Give back n of `worker`'s claims; `for_queued`: their trials' retries are queued, keep
        the claims for them."""
        with self._claimed.get_lock():
            self._claimed.value -= n
            self._by[worker] = max(0, self._by[worker] - n)
            if for_queued:
                self._reserved.value += n

    def give_back(self, n: int = 1, *, for_queued: bool = False, worker: int = 0) -> None:
        """`release`, as the ledger's claim rules call it (study.run.ledger.give_back)."""
        self.release(n, for_queued=for_queued, worker=worker)

    def reserved(self) -> int:
        return self._reserved.value

    def spent(self) -> bool:
        """Nothing left for any worker of the run to start: stopped, past the deadline, or every
        trial claimed or reserved. A worker that cannot claim while the budget is not spent is
        held by its share: another worker, under its share, will claim what is left, or end
        and so lift the shares; it must not end itself first."""
        with self._claimed.get_lock():
            if self._stopped.value or self._claimed.value + self._reserved.value >= self.n_trials:
                return True
        return self.deadline is not None and time.time() >= self.deadline

    def unreserve(self) -> None:
        """The claims reserved for retries that did not come are free for new trials."""
        with self._claimed.get_lock():
            self._reserved.value = 0

    def stop(self) -> None:
        self._stopped.value = 1

    def ended(self) -> None:
        """A worker's engine ran to its end (the budget looked spent to it): the shares no
        longer hold the others back."""
        with self._claimed.get_lock():
            self._ended.value += 1


class Claims:
    """The claims of one batched engine, counted where its writer process sees them: the
    trainer adds one before it hands a trial over; the writer gives back those of trials it
    could not store or that another process failed, and, if the trainer dies, those of trials
    never handed over. `budget` None: a writer run alone (tests, load_check)."""

    def __init__(self, budget: Budget | None, worker: int = 0):
        self.budget, self.worker = budget, worker
        self._count = _CTX.Value("i", 0)

    def add(self) -> None:
        with self._count.get_lock():
            self._count.value += 1

    def count(self) -> int:
        return self._count.value

    def give_back(self, n: int = 1, *, for_queued: bool = False) -> None:
        if n <= 0:
            return
        with self._count.get_lock():
            self._count.value -= n
        if self.budget is not None:
            self.budget.release(n, for_queued=for_queued, worker=self.worker)
